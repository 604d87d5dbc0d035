//! Every CUDA kernel source compiles with NVRTC for sm_80 (A100) and sm_90 (H100 / H200), and
//! ptxas reports no register spills, on a machine with no GPU (issue 11). NVRTC and the CUDA
//! headers come from `tools/fetch_cuda_tools.sh` (`tools/test.sh`, what CI runs, sets
//! `PIPEFUSE_CUDA_INCLUDE` and the library path). Without them this test fails saying so;
//! `PIPEFUSE_SKIP_NVRTC=1` skips it explicitly (and says so).
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use kernels::cuda::{compile, compile_ptx, compile_source, parse_ptxas_report, SOURCES};

fn include() -> Option<PathBuf> {
    std::env::var_os("PIPEFUSE_CUDA_INCLUDE").map(PathBuf::from)
}

#[test]
fn nvrtc_compiles_every_kernel_for_sm80_and_sm90_without_spills() {
    if std::env::var_os("PIPEFUSE_SKIP_NVRTC").is_some() {
        eprintln!("PIPEFUSE_SKIP_NVRTC set: the CUDA kernels were NOT compiled");
        return;
    }
    let include = include().expect(
        "PIPEFUSE_CUDA_INCLUDE is not set: run the tests with tools/test.sh (it fetches NVRTC and \
         the CUDA headers), or set PIPEFUSE_SKIP_NVRTC=1 to skip this check explicitly",
    );
    for (file, src) in SOURCES {
        let wanted: Vec<&str> = src
            .lines()
            .filter_map(|l| l.split("void ").nth(1))
            .filter_map(|l| l.split('(').next())
            .filter(|n| n.contains("##SUFFIX") && !n.contains("##DP"))
            .collect();
        for arch in ["sm_80", "sm_90"] {
            let c = compile(file, arch, &include).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                !c.entries.is_empty(),
                "{file} {arch}: no entry points in\n{}",
                c.log
            );
            for e in &c.entries {
                eprintln!(
                    "{file} {arch} {}: {} registers, {} bytes stack",
                    e.name, e.registers, e.stack_bytes
                );
                assert_eq!(
                    e.spill_bytes, 0,
                    "{file} {arch} {}: spills\n{}",
                    e.name, c.log
                );
                assert_eq!(
                    e.stack_bytes, 0,
                    "{file} {arch} {}: a stack frame (registers demoted to local memory)\n{}",
                    e.name, c.log
                );
                assert!(
                    e.registers > 0,
                    "{file} {arch} {}: no register report",
                    e.name
                );
            }
            // Every declared entry point exists in each of its element types (the tensor-core
            // kernels, one per padded head dimension DP, in bf16 and f16).
            for entry in kernels::cuda::launch::ENTRIES
                .iter()
                .filter(|e| e.file == *file)
            {
                for dtype in entry.dtypes {
                    let name = format!("{}_{dtype}", entry.base);
                    assert!(
                        c.entries.iter().any(|e| e.name == name),
                        "{file} {arch}: declared entry {name} missing"
                    );
                }
            }
            // Every other templated entry point exists in f32, bf16 and f16.
            for stem in &wanted {
                let stem = stem.trim_end_matches("##SUFFIX");
                for t in ["f32", "bf16", "f16"] {
                    let name = format!("{stem}{t}");
                    assert!(
                        c.entries.iter().any(|e| e.name == name),
                        "{file} {arch}: entry {name} missing"
                    );
                }
            }
        }
    }
}

/// A kernel with an error is refused with the compiler's message (CI catches kernel bugs).
#[test]
fn nvrtc_reports_compile_errors_and_spills() {
    let report = "ptxas info    : Compiling entry function 'k_f32' for 'sm_90'\n\
                  ptxas info    : Function properties for k_f32\n\
                  \x20   8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
                  ptxas info    : Used 255 registers, 380 bytes cmem[0]\n";
    let e = parse_ptxas_report(report);
    assert_eq!(e.len(), 1);
    assert_eq!(
        (
            e[0].name.as_str(),
            e[0].registers,
            e[0].spill_bytes,
            e[0].stack_bytes
        ),
        ("k_f32", 255, 12, 8)
    );
    if std::env::var_os("PIPEFUSE_SKIP_NVRTC").is_some() {
        return;
    }
    let include = include().expect("PIPEFUSE_CUDA_INCLUDE (see the other test)");
    let err = compile("no_such.cu", "sm_90", &include)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such kernel source"), "{err}");
    let broken = "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }";
    let err = compile_source("broken.cu", broken, "sm_90", &include)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.cu for sm_90") && err.contains("undefined_name"),
        "{err}"
    );
}

/// What a GPU loads: PTX for its virtual architecture, with every entry point (the prepared GPU
/// check compiles this way on the lent machine).
#[test]
fn nvrtc_ptx_for_compute_90_has_every_entry_point() {
    if std::env::var_os("PIPEFUSE_SKIP_NVRTC").is_some() {
        return;
    }
    let include = include().expect("PIPEFUSE_CUDA_INCLUDE (see the first test)");
    let ptx = compile_ptx("attention.cu", "compute_90", &include).unwrap_or_else(|e| panic!("{e}"));
    for t in ["f32", "bf16", "f16"] {
        assert!(
            ptx.contains(&format!(".entry attention_{t}(")),
            "attention_{t} missing"
        );
    }
    let ptx = compile_ptx("norm.cu", "compute_80", &include).unwrap();
    assert!(ptx.contains(".target sm_80"), "target");
}

/// Every kernel the CUDA ops launch is declared (`kernels::cuda::launch::ENTRIES`) with the
/// parameters NVRTC's PTX gives its f32, bf16 and f16 entry points, in order and width: a launch
/// whose parameters disagree with its kernel would corrupt memory silently on a GPU, and each
/// launch checks its values against these declarations.
#[test]
fn nvrtc_entry_points_match_the_launch_declarations() {
    use kernels::cuda::launch::{ptx_params, Entry, ParamKind, ENTRIES};
    if std::env::var_os("PIPEFUSE_SKIP_NVRTC").is_some() {
        eprintln!("skipped: PIPEFUSE_SKIP_NVRTC is set");
        return;
    }
    let include = include().expect("PIPEFUSE_CUDA_INCLUDE (see the first test)");
    let declared = |e: &Entry| {
        e.params
            .iter()
            .map(|p| p.ptx().to_string())
            .collect::<Vec<_>>()
    };
    for entry in ENTRIES {
        let ptx = compile_ptx(entry.file, "compute_90", &include).unwrap_or_else(|e| panic!("{e}"));
        for dtype in entry.dtypes {
            let name = format!("{}_{dtype}", entry.base);
            let found =
                ptx_params(&ptx, &name).unwrap_or_else(|| panic!("{name} not in {}", entry.file));
            assert_eq!(found, declared(entry), "{name}: PTX vs launch declaration");
        }
    }
    // The comparison can fail: a declaration with two parameters swapped is told apart.
    let ptx = compile_ptx("norm.cu", "compute_90", &include).unwrap();
    let mut swapped = kernels::cuda::launch::LAYER_NORM_MODULATE.params.to_vec();
    swapped.swap(5, 6);
    let swapped: Vec<String> = swapped
        .iter()
        .map(|p: &ParamKind| p.ptx().to_string())
        .collect();
    assert_ne!(
        ptx_params(&ptx, "layer_norm_modulate_f32").unwrap(),
        swapped
    );
    assert!(ptx_params(&ptx, "no_such_kernel_f32").is_none());
}
