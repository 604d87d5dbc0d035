//! One section of a prepared GPU check, guarded: an error or a panic is printed as a JSON line
//! (`{"check": label..., "error": ..., "ok": false}`) and the caller goes on with the next
//! section, so one GPU session learns as much as it can. Shared by `kernels/examples/gpu_check.rs`
//! and `model/examples/gpu_golden.rs` (included by path).

/// Runs `section`; false (after printing the error line) if it failed. `label` is the JSON
/// fields naming it, e.g. `"check":"linear","dtype":"bf16"`.
pub(crate) fn guarded(label: &str, section: impl FnOnce() -> Result<(), String>) -> bool {
    let error = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(section)) {
        Ok(Ok(())) => return true,
        Ok(Err(e)) => e,
        Err(p) => format!(
            "panicked: {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or(p.downcast_ref::<&str>().copied())
                .unwrap_or("?")
        ),
    };
    let error = error
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    println!("{{{label},\"error\":\"{error}\",\"ok\":false}}");
    false
}
