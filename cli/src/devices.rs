//! `pipefuse devices`: what this machine offers a cluster: the CPU (model, cores, the vector
//! instructions the kernels can use) and the CUDA GPUs, or why there are none.

use anyhow::{bail, Result};

/// The CPU's model name and the instruction-set flags that matter to the kernels (Linux
/// `/proc/cpuinfo`; elsewhere only the core count is known).
pub(crate) fn cpu_summary() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let flags = field("flags").unwrap_or_default();
    let isa: Vec<&str> = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    let family = match (field("cpu family"), field("model\t")) {
        (Some(f), Some(m)) => format!(", family {f} model {m}"),
        _ => String::new(),
    };
    format!(
        "cpu: {model}{family}, {} cores, {}",
        crate::cluster_args::cores(),
        if isa.is_empty() {
            "no AVX2".to_string()
        } else {
            isa.join(" ")
        }
    )
}

/// What every benchmark prints first: the CPU (model, cores, ISA) and the GEMM kernels this
/// process dispatches to.
pub(crate) fn bench_header() -> String {
    #[cfg(target_arch = "x86_64")]
    let f32_kernels = if std::arch::is_x86_feature_detected!("avx512f") {
        "AVX-512"
    } else if std::arch::is_x86_feature_detected!("fma") {
        "AVX2/FMA"
    } else {
        "SSE"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let f32_kernels = "portable";
    format!(
        "{}; f32 linears: {}; f32 attention: {}; other f32 products: gemm crate, {f32_kernels} \
         kernels; bf16 GEMM: {}",
        cpu_summary(),
        kernels::f32_gemm_path(),
        kernels::f32_attention_path(),
        kernels::bf16_gemm_path()
    )
}

pub(crate) fn run() -> Result<()> {
    println!("{}", cpu_summary());
    let libraries = kernels::cuda_libraries();
    if !libraries.is_empty() {
        let found: Vec<String> = libraries
            .iter()
            .map(|(name, ok)| format!("{name} {}", if *ok { "found" } else { "missing" }))
            .collect();
        println!("cuda libraries: {}", found.join(", "));
    }
    match kernels::cuda_devices() {
        Ok(devices) if !devices.is_empty() => {
            for d in devices {
                println!(
                    "cuda:{} {}, {:.1} GiB, compute capability {}.{}",
                    d.ordinal,
                    d.name,
                    d.total_memory as f64 / (1u64 << 30) as f64,
                    d.compute_capability.0,
                    d.compute_capability.1
                );
            }
            Ok(())
        }
        Ok(_) => bail!("no CUDA device: the driver reports none"),
        Err(why) => bail!("no CUDA device: {why}"),
    }
}
