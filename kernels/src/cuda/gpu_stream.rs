//! One context and one stream per GPU in a process, shared by every [`super::CudaDevice`]
//! opened on it (two pipeline stages on one GPU, a stage and its VAE decoder).
//!
//! Everything that runs on a GPU is queued on its one stream, in the order the host issues it:
//! a tensor one stage produced and another reads, and a buffer freed (`cuMemFreeAsync` on the
//! same stream) after its last use, are ordered by the stream itself. So cudarc's per-buffer
//! event tracking, which exists to order buffers between streams, is turned off before the
//! first allocation: with it, every allocation created two events and every kernel operand
//! recorded or waited on one, host work of the order of the launch itself. Work on two GPUs
//! meets only through copies that synchronise with their source (downloads, or peer copies
//! ordered by an event: `storage.rs`).
//!
//! The stream-ordered memory pool keeps what is freed (its release threshold raised from 0,
//! the driver's default, which hands memory back to the system at every synchronisation and
//! makes the next step's allocations map pages again): a stage's working set is allocated once
//! and reused step after step, as PyTorch's caching allocator does.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::storage::driver_error;
use crate::{KernelError, Result};

/// The stream of GPU `ordinal` (its context is `stream.context()`), opened on first use and
/// shared while any device holds it.
pub(super) fn gpu_stream(ordinal: usize) -> Result<Arc<CudaStream>> {
    static OPEN: OnceLock<Mutex<HashMap<usize, Weak<CudaStream>>>> = OnceLock::new();
    let open = OPEN.get_or_init(|| Mutex::new(HashMap::new()));
    let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(stream) = open.get(&ordinal).and_then(Weak::upgrade) {
        return Ok(stream);
    }
    let unavailable = |reason: String| KernelError::CudaNotAvailable { ordinal, reason };
    let ctx = match catch_unwind(AssertUnwindSafe(|| CudaContext::new(ordinal))) {
        Ok(Ok(ctx)) => ctx,
        Ok(Err(e)) => return Err(unavailable(format!("{e:?}"))),
        Err(_) => return Err(unavailable("the CUDA driver could not be used".into())),
    };
    // SAFETY: every buffer of this context is used on the one stream made below (module doc);
    // no buffer exists yet, so none was made with tracking on.
    unsafe { ctx.disable_event_tracking() };
    keep_freed_memory(&ctx, ordinal);
    let stream = ctx.new_stream().map_err(|e| driver_error("stream", e))?;
    open.insert(ordinal, Arc::downgrade(&stream));
    Ok(stream)
}

/// Raises the release threshold of the GPU's default memory pool (what `cuMemAllocAsync`
/// allocates from) so that freed memory stays in the pool. A failure only costs speed: logged.
fn keep_freed_memory(ctx: &Arc<CudaContext>, ordinal: usize) {
    let outcome = (|| {
        ctx.bind_to_thread()?;
        // SAFETY: the context's own device; the attribute is a u64 (cuMemPoolSetAttribute).
        unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device())?;
            let mut keep = u64::MAX;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut std::ffi::c_void,
            )
        }
    })();
    if let Err(e) = outcome {
        tracing::warn!(ordinal, error = ?e, "the memory pool will hand freed memory back at each synchronisation");
    }
}
