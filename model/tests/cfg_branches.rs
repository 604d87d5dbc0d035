//! CFG parallel's split of a guided request: running the two branches as separate forwards of
//! batch B and guiding their concatenated outputs gives what one forward of the doubled batch
//! gives (ALGORITHMS.md section 3).

mod common;

use kernels::{Device, Tensor};
use model::{Arch, Caption, PreparedRequest, Request, Transformer};

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 37 + seed * 11) % 101) as f32 / 50.0) - 1.0)
        .collect()
}

fn request(arch: Arch) -> Request {
    let t = |shape: &[usize], seed| {
        Tensor::from_vec(values(shape.iter().product(), seed), shape).unwrap()
    };
    Request {
        class_labels: if arch == Arch::Dit {
            vec![3, 7]
        } else {
            vec![]
        },
        caption: (arch == Arch::PixArt).then(|| Caption {
            embeds: t(&[2, 5, 12], 1),
            mask: Some(
                Tensor::from_vec(vec![1., 1., 1., 0., 0., 1., 1., 1., 1., 1.], &[2, 5]).unwrap(),
            ),
            negative: Some((t(&[2, 5, 12], 2), None)),
            pooled: None,
            negative_pooled: None,
        }),
        guidance_scale: 4.5,
        latent_size: [8, 12],
        embedded_guidance: None,
    }
}

#[test]
fn two_branches_guide_to_the_doubled_forward() {
    for arch in [Arch::Dit, Arch::PixArt] {
        let cfg = common::tiny(arch);
        let model = Transformer::random(cfg.clone(), 5, None, Device::cpu(1).unwrap()).unwrap();
        let full = PreparedRequest::new(&cfg, &request(arch)).unwrap();
        assert_eq!(full.cfg_branches(), 2);
        let x = Tensor::from_vec(values(2 * 4 * 8 * 12, 3), &[2, 4, 8, 12]).unwrap();
        let t = 500.0;
        let one = full
            .guide(
                &model
                    .forward(&full.model_input(&x).unwrap(), &full.inputs(t))
                    .unwrap(),
            )
            .unwrap();
        let outs: Vec<Tensor> = (0..2)
            .map(|b| {
                let br = full.cfg_branch(b).unwrap();
                assert_eq!(br.forward_batch(), 2);
                model
                    .forward(&br.model_input(&x).unwrap(), &br.inputs(t))
                    .unwrap()
            })
            .collect();
        let split = full
            .guide(&Tensor::cat(&[&outs[0], &outs[1]], 0).unwrap())
            .unwrap();
        assert_eq!(split.shape(), one.shape());
        let err = common::max_abs(&split, &one);
        eprintln!("{arch:?}: max abs difference {err}");
        assert!(err <= 1e-5, "{arch:?}: max abs difference {err}");
    }
}

#[test]
fn unguided_requests_have_no_branches() {
    let cfg = common::tiny(Arch::Dit);
    let req = Request {
        guidance_scale: 1.0,
        ..request(Arch::Dit)
    };
    let p = PreparedRequest::new(&cfg, &req).unwrap();
    assert_eq!(p.cfg_branches(), 1);
    let e = p.cfg_branch(0).unwrap_err().to_string();
    assert!(e.contains("guidance scale above 1"), "{e}");
}
