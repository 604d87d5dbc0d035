//! Page-locked host staging for what crosses between host memory and a GPU: patch activations
//! from and to the network, inputs, outputs. A copy from pageable memory is staged by the driver
//! (and cudarc makes an upload wait for the whole stream besides); from page-locked memory it
//! runs at the link's full rate and an upload returns at once.
//!
//! - **Uploads** go through a ring of [`UPLOAD_SLOTS`] page-locked buffers per GPU: the host
//!   bytes are copied into the next slot, the slot's copy to the GPU is queued on the stream and
//!   an event recorded after it; the slot is reused only once its event has passed. The host
//!   queues the work that reads the upload without waiting for the GPU.
//! - **Downloads** go through one page-locked buffer per GPU: the copy is queued behind the work
//!   that produces the tensor, the stream synchronised, and the bytes copied out.
//!
//! Buffers grow to the largest transfer seen (powers of two from 1 MiB); a transfer larger than
//! [`MAX_STAGED`] (weights at load) goes the pageable way, once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    result, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice,
};

use super::storage::driver_error;
use crate::Result;

/// Page-locked buffers in flight for uploads, per GPU.
pub(super) const UPLOAD_SLOTS: usize = 4;

/// The largest transfer that is staged; larger ones are copied from pageable memory.
pub(super) const MAX_STAGED: usize = 64 << 20;

/// A page-locked buffer and the event recorded after the last copy that used it.
struct Slot {
    host: PinnedHostSlice<u8>,
    done: Option<CudaEvent>,
}

impl Slot {
    /// A buffer of at least `n` bytes in `ctx` (this slot's, or a new one if it is too small).
    fn ensure(slot: &mut Option<Slot>, ctx: &Arc<CudaContext>, n: usize) -> Result<()> {
        if let Some(s) = slot {
            if s.host.len() >= n && Arc::ptr_eq(s.host.context(), ctx) {
                return Ok(());
            }
            // Its last copy must finish before the buffer is freed.
            s.wait()?;
        }
        let len = n.next_power_of_two().max(1 << 20);
        // Plain page-locked memory (not write-combined: downloads are read by the host).
        // SAFETY: the bytes are written before they are read (copies below).
        let host = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }
            .map_err(|e| driver_error("page-locked staging", e))?;
        *slot = Some(Slot { host, done: None });
        Ok(())
    }

    /// Waits until the last copy that used this buffer has finished.
    fn wait(&mut self) -> Result<()> {
        if let Some(done) = self.done.take() {
            done.synchronize()
                .map_err(|e| driver_error("staging wait", e))?;
        }
        Ok(())
    }
}

/// The upload ring of one GPU and its next slot.
#[derive(Default)]
struct Ring {
    slots: [Option<Slot>; UPLOAD_SLOTS],
    next: usize,
}

/// One GPU's staging: uploads and downloads lock separately (a download waits for the stream).
#[derive(Default)]
struct Staging {
    uploads: Mutex<Ring>,
    download: Mutex<Option<Slot>>,
}

/// GPU `ordinal`'s staging (made on first use, kept for the process).
fn staging_of(ordinal: usize) -> Arc<Staging> {
    static STAGING: OnceLock<Mutex<HashMap<usize, Arc<Staging>>>> = OnceLock::new();
    let all = STAGING.get_or_init(|| Mutex::new(HashMap::new()));
    let mut all = all.lock().unwrap_or_else(|e| e.into_inner());
    all.entry(ordinal).or_default().clone()
}

/// A new buffer on `stream`'s GPU holding `bytes` (at least one byte: the driver refuses empty
/// allocations).
pub(super) fn upload(stream: &Arc<CudaStream>, bytes: &[u8]) -> Result<CudaSlice<u8>> {
    let n = bytes.len();
    if n == 0 {
        return stream
            .alloc_zeros::<u8>(1)
            .map_err(|e| driver_error("upload", e));
    }
    if n > MAX_STAGED {
        return stream
            .clone_htod(bytes)
            .map_err(|e| driver_error("upload", e));
    }
    // SAFETY: all `n` bytes are written by the copy below before anything reads them.
    let mut dst = unsafe { stream.alloc::<u8>(n) }.map_err(|e| driver_error("upload", e))?;
    let ctx = stream.context();
    ctx.bind_to_thread()
        .map_err(|e| driver_error("upload", e))?;
    let staging = staging_of(ctx.ordinal());
    let mut ring = staging.uploads.lock().unwrap_or_else(|e| e.into_inner());
    let i = ring.next;
    ring.next = (i + 1) % UPLOAD_SLOTS;
    let slot = &mut ring.slots[i];
    Slot::ensure(slot, ctx, n)?;
    let slot = slot.as_mut().expect("ensured above");
    slot.wait()?;
    let host = slot
        .host
        .as_mut_slice()
        .map_err(|e| driver_error("upload", e))?;
    host[..n].copy_from_slice(bytes);
    {
        let (d, _guard) = dst.device_ptr_mut(stream);
        // SAFETY: `dst` holds `n` bytes; the page-locked source stays untouched until the event
        // recorded next has passed (`Slot::wait`).
        unsafe { result::memcpy_htod_async(d, &host[..n], stream.cu_stream()) }
            .map_err(|e| driver_error("upload", e))?;
    }
    slot.done = Some(
        stream
            .record_event(None)
            .map_err(|e| driver_error("upload", e))?,
    );
    Ok(dst)
}

/// The first `n` bytes of `src`, once the work queued before on its stream has produced them.
pub(super) fn download(src: &CudaSlice<u8>, n: usize) -> Result<Vec<u8>> {
    let stream = src.stream();
    if n == 0 {
        return Ok(Vec::new());
    }
    if n > MAX_STAGED {
        return stream
            .clone_dtoh(&src.slice(..n))
            .map_err(|e| driver_error("download", e));
    }
    let ctx = stream.context();
    ctx.bind_to_thread()
        .map_err(|e| driver_error("download", e))?;
    let staging = staging_of(ctx.ordinal());
    let mut slot = staging.download.lock().unwrap_or_else(|e| e.into_inner());
    Slot::ensure(&mut slot, ctx, n)?;
    let slot = slot.as_mut().expect("ensured above");
    let host = slot
        .host
        .as_mut_slice()
        .map_err(|e| driver_error("download", e))?;
    let (s, _guard) = src.device_ptr(stream);
    // SAFETY: `src` holds at least `n` bytes, the buffer at least `n`; the stream is synchronised
    // before the host reads them.
    unsafe { result::memcpy_dtoh_async(&mut host[..n], s, stream.cu_stream()) }
        .map_err(|e| driver_error("download", e))?;
    stream
        .synchronize()
        .map_err(|e| driver_error("download", e))?;
    Ok(host[..n].to_vec())
}
