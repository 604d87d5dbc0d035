//! `BlockCopy`, the primitive behind `narrow`, `cat` and writing rows into a buffer on every
//! backend (on a GPU it becomes one 2-D copy per batch, so its geometry is what the GPU path
//! relies on): checked against index-by-index definitions for random shapes and dtypes, and its
//! bounds checks refuse what does not fit.

use kernels::{BlockCopy, CpuStorage, DType, Strides, Tensor};
use proptest::prelude::*;

fn iota(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|i| i as f32).collect(), shape).unwrap()
}

/// Element `idx` (multi-index) of a row-major `shape`.
fn flat(shape: &[usize], idx: &[usize]) -> usize {
    shape.iter().zip(idx).fold(0, |acc, (d, i)| acc * d + i)
}

fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]];
    for &d in shape {
        out = out
            .into_iter()
            .flat_map(|p| (0..d).map(move |i| [p.clone(), vec![i]].concat()))
            .collect();
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn narrow_and_cat_match_their_definitions(
        shape in proptest::collection::vec(1usize..5, 1..5),
        dim_pick in 0usize..8, cut_pick in 0usize..8, dtype in 0usize..3,
    ) {
        let dim = dim_pick % shape.len();
        let cut = cut_pick % (shape[dim] + 1);
        let dtype = [DType::F32, DType::F16, DType::BF16][dtype];
        let t = iota(&shape).to_dtype(dtype).unwrap();
        let (a, b) = (t.narrow(dim, 0, cut).unwrap(), t.narrow(dim, cut, shape[dim] - cut).unwrap());
        prop_assert_eq!(a.dtype(), dtype);
        let (tv, av, bv) = (t.to_vec_f32().unwrap(), a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
        // Every element of each part is the element of t at the shifted index.
        for idx in indices(a.shape()) {
            prop_assert_eq!(av[flat(a.shape(), &idx)], tv[flat(&shape, &idx)]);
        }
        for idx in indices(b.shape()) {
            let mut at = idx.clone();
            at[dim] += cut;
            prop_assert_eq!(bv[flat(b.shape(), &idx)], tv[flat(&shape, &at)]);
        }
        // Concatenating the parts gives t back.
        let back = Tensor::cat(&[&a, &b], dim).unwrap();
        prop_assert_eq!(back.shape(), &shape[..]);
        prop_assert_eq!(back.to_vec_f32().unwrap(), tv);
    }
}

#[test]
fn rows_written_into_a_buffer_land_where_the_definition_says() {
    // A [2, 6, 4] buffer gets a [2, 3, 4] block at rows 2..5 of dim 1 (PipeFusion's K/V write).
    let mut buf = Tensor::zeros(&[2, 6, 4]);
    let src = iota(&[2, 3, 4]);
    buf.copy_block(&src, &BlockCopy::into_rows(&[2, 3, 4], &[2, 6, 4], 1, 2))
        .unwrap();
    let (b, s) = (buf.as_f32().unwrap(), src.as_f32().unwrap());
    for idx in indices(&[2, 6, 4]) {
        let want = if (2..5).contains(&idx[1]) {
            s[flat(&[2, 3, 4], &[idx[0], idx[1] - 2, idx[2]])]
        } else {
            0.0
        };
        assert_eq!(b[flat(&[2, 6, 4], &idx)], want, "{idx:?}");
    }
}

#[test]
fn copies_that_do_not_fit_are_refused_and_copy_nothing() {
    let mut dst = Tensor::zeros(&[4, 4]);
    let src = iota(&[4, 4]);
    let side = |offset, row| Strides {
        offset,
        row,
        batch: 0,
    };
    let over = BlockCopy {
        batches: 1,
        rows: 4,
        width: 4,
        src: side(1, 4),
        dst: side(0, 4),
    };
    let e = dst.copy_block(&src, &over).unwrap_err().to_string();
    assert!(
        e.contains("copy_block") && e.contains("does not fit"),
        "{e}"
    );
    // Destination runs that overlap each other are refused too.
    let overlap = BlockCopy {
        batches: 1,
        rows: 2,
        width: 4,
        src: side(0, 4),
        dst: side(0, 2),
    };
    assert!(dst.copy_block(&src, &overlap).is_err());
    // A stride product that overflows is refused, not wrapped.
    let huge = BlockCopy {
        batches: 1,
        rows: 3,
        width: 1,
        src: side(0, usize::MAX / 2),
        dst: side(0, 1),
    };
    assert!(dst.copy_block(&src, &huge).is_err());
    assert!(
        dst.as_f32().unwrap().iter().all(|&v| v == 0.0),
        "nothing copied"
    );
    // Dtypes must agree.
    let half = Tensor::from_cpu(CpuStorage::F16(vec![half::f16::ZERO; 16]), &[4, 4]).unwrap();
    let ok = BlockCopy::narrow(&[4, 4], 0, 0, 4);
    assert!(dst
        .copy_block(&half, &ok)
        .unwrap_err()
        .to_string()
        .contains("dtype"));
    // Out-of-range narrows are errors naming the op.
    assert!(src
        .narrow(1, 3, 2)
        .unwrap_err()
        .to_string()
        .contains("narrow"));
    assert!(src.narrow(2, 0, 1).is_err());
    assert!(src.narrow(0, usize::MAX, 2).is_err());
}
