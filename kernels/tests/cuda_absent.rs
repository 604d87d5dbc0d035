//! Asking for CUDA never panics: with no `cuda` feature, no driver or no such device,
//! `Device::cuda` and `cuda_devices` say why (DEPENDENCIES.md section 4: cudarc's loader panics
//! when a library is missing, so presence is checked first). Holds on any machine: with GPUs, the
//! ordinal past the last one is refused naming how many there are.

use kernels::{cuda_devices, cuda_libraries, Device};

#[test]
fn cuda_requests_end_in_errors_that_say_why() {
    let err = |ordinal| {
        Device::cuda(ordinal)
            .err()
            .unwrap_or_else(|| {
                panic!("cuda:{ordinal} was opened, but this ordinal does not exist here")
            })
            .to_string()
    };
    match cuda_devices() {
        Err(why) => {
            assert!(!why.is_empty());
            let e = err(0);
            assert!(
                e.starts_with("CUDA device 0 requested: ") && e.contains(&why),
                "{e}"
            );
            if cfg!(not(feature = "cuda")) {
                assert!(why.contains("`cuda` feature"), "{why}");
                assert!(cuda_libraries().is_empty());
            } else {
                assert_eq!(cuda_libraries().len(), 4);
            }
        }
        Ok(devices) => {
            let e = err(devices.len());
            assert!(
                e.contains(&format!("{} CUDA device(s)", devices.len())),
                "{e}"
            );
            for d in &devices {
                assert!(d.total_memory > 0 && d.compute_capability.0 > 0, "{d:?}");
            }
        }
    }
}
