//! PipeFusion's per-layer K/V buffers over the full sequence (ALGORITHMS.md §2, "KV buffer").
//!
//! A stage keeps, for every self-attention layer it owns, the keys and values of all `S` image
//! tokens of the current request: `[B', S, 2d]` per layer (K in columns `0..d`, V in `d..2d`, so a
//! patch's fused-QKV output is copied with one contiguous run per row). A patch writes its own rows
//! and attends to the whole buffer: rows written earlier this step are fresh, the rest are from
//! the previous step. Tokens never written in this request are masked out (warmup W = 0).

use kernels::{AttnView, BlockCopy, Device, Strides, Tensor};

use crate::error::{ModelError, Result};

/// Where a block's self-attention keeps its keys and values when it runs on a patch: layer
/// `layer` of `buf`, the patch's tokens starting at token `first` of the image.
pub struct KvSlot<'a> {
    pub(crate) buf: &'a mut KvBuffer,
    pub(crate) layer: usize,
    pub(crate) first: usize,
    /// MMDiT: where the gathered part's prompt rows go and which keys the attention reads.
    pub(crate) joint: JointRows,
}

/// How an MMDiT part's gathered keys and values map onto the buffer's rows (DiT and PixArt:
/// the default, no prompt rows and every buffer row read).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct JointRows {
    /// Prompt tokens T at the end (SD3) or the start (Flux) of the gathered part.
    pub(crate) prompt: usize,
    /// The prompt comes first in the gathered part (Flux).
    pub(crate) prompt_first: bool,
    /// Buffer row of the prompt's first token.
    pub(crate) prompt_at: usize,
    /// Attend to the first `n` buffer rows only (SD3.5's image-only attention); 0 = all.
    pub(crate) keys: usize,
}

/// K/V buffers of the layers one stage owns, for one request.
#[derive(Debug, Clone)]
pub struct KvBuffer {
    /// One `[B', S, 2d]` tensor per owned layer.
    layers: Vec<Tensor>,
    /// Tokens written at least once in this request.
    written: Vec<bool>,
    /// `[B', S]` additive key bias (0 or -inf) while some tokens are unwritten.
    bias: Option<Tensor>,
    batch: usize,
    tokens: usize,
    hidden: usize,
    /// Where the buffers live (the stage's device: on a GPU, they never leave it).
    device: Device,
}

impl KvBuffer {
    /// Empty buffers on `device` (its memory and compute dtype) for `layers` layers, batch
    /// `batch` (B', CFG-doubled), `tokens` (S) and hidden size `hidden` (d):
    /// `2 * batch * tokens * hidden * layers` elements.
    pub fn new(
        device: &Device,
        layers: usize,
        batch: usize,
        tokens: usize,
        hidden: usize,
    ) -> Result<KvBuffer> {
        Ok(KvBuffer {
            layers: (0..layers)
                .map(|_| device.zeros(&[batch, tokens, 2 * hidden]))
                .collect::<kernels::Result<_>>()?,
            written: vec![false; tokens],
            bias: None,
            batch,
            tokens,
            hidden,
            device: device.clone(),
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let elem = self.layers.first().map_or(4, |t| t.dtype().size_in_bytes());
        self.layers.len() * self.batch * self.tokens * 2 * self.hidden * elem
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `(B', S)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.batch, self.tokens)
    }

    /// Forgets every token (a new request): nothing stale from another request is ever read.
    pub fn reset(&mut self) {
        self.written.iter_mut().for_each(|w| *w = false);
        self.bias = None;
    }

    /// Marks tokens `first..first + n` as written (call before the layers run on them, so each
    /// layer's own write of those rows precedes its attention) and rebuilds the mask.
    pub(crate) fn mark_written(&mut self, first: usize, n: usize) -> Result<()> {
        if first + n > self.tokens {
            return Err(ModelError::Input(format!(
                "tokens {first}..{} are outside the K/V buffer's {} tokens",
                first + n,
                self.tokens
            )));
        }
        self.written[first..first + n]
            .iter_mut()
            .for_each(|w| *w = true);
        self.bias = key_mask(&self.device, &self.written, self.batch)?;
        Ok(())
    }

    /// [`bias`](Self::bias) of the first `n` tokens only (`[B', n]`; `None` if all are written).
    pub(crate) fn bias_prefix(&self, n: usize) -> Result<Option<Tensor>> {
        if n > self.tokens {
            return Err(ModelError::Input(format!(
                "{n} tokens asked of a K/V buffer of {}",
                self.tokens
            )));
        }
        key_mask(&self.device, &self.written[..n], self.batch)
    }

    /// Copies K and V of `qkv: [B', n, 3d]` (columns `d..3d`) into rows `first..first + n` of
    /// layer `layer`'s buffer.
    pub(crate) fn write(&mut self, layer: usize, first: usize, qkv: &Tensor) -> Result<()> {
        self.copy_in(layer, first, qkv, 3)
    }

    /// Copies `kv: [B', n, 2d]` (K and V side by side) into rows `first..first + n` of layer
    /// `layer`'s buffer.
    pub(crate) fn write_kv(&mut self, layer: usize, first: usize, kv: &Tensor) -> Result<()> {
        self.copy_in(layer, first, kv, 2)
    }

    /// `src: [B', n, parts * d]` whose last `2d` columns are K and V.
    fn copy_in(&mut self, layer: usize, first: usize, src: &Tensor, parts: usize) -> Result<()> {
        let (b, d, s) = (self.batch, self.hidden, self.tokens);
        let n = src.dim(1);
        if src.shape() != [b, n, parts * d] || first + n > s {
            return Err(ModelError::Input(format!(
                "K/V of shape {:?} at token {first} does not fit the buffer [{b}, {s}, {}]",
                src.shape(),
                2 * d
            )));
        }
        let buf = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::Input(format!("the K/V buffer has no layer {layer}")))?;
        // Row j of batch bi: the last 2d columns of src row (bi, j) -> buffer row first + j.
        let copy = BlockCopy {
            batches: b,
            rows: n,
            width: 2 * d,
            src: Strides {
                offset: (parts - 2) * d,
                row: parts * d,
                batch: n * parts * d,
            },
            dst: Strides {
                offset: first * 2 * d,
                row: 2 * d,
                batch: s * 2 * d,
            },
        };
        buf.copy_block(src, &copy)?;
        Ok(())
    }

    /// Attention of queries `q` (`heads` heads of `head_dim`, the buffer's width) over layer
    /// `layer`'s keys and values: all its rows, or with `keys = Some(n)` only the first `n`
    /// (SD3.5's image-only attention); unwritten rows are masked.
    pub(crate) fn attend(
        &self,
        dev: &Device,
        layer: usize,
        q: AttnView<'_>,
        keys: Option<usize>,
        (batch, heads, head_dim): (usize, usize, usize),
    ) -> Result<Tensor> {
        let kv = self
            .layers
            .get(layer)
            .ok_or_else(|| ModelError::Input(format!("the K/V buffer has no layer {layer}")))?;
        let prefix_bias;
        let (seq, bias) = match keys {
            None => (self.tokens, self.bias.as_ref()),
            Some(n) => {
                prefix_bias = self.bias_prefix(n)?;
                (n, prefix_bias.as_ref())
            }
        };
        let view = |col| AttnView {
            tensor: kv,
            seq,
            batch_stride: self.tokens * 2 * self.hidden,
            row_stride: 2 * self.hidden,
            col_offset: col,
        };
        Ok(dev.attention(q, view(0), view(self.hidden), bias, batch, heads, head_dim)?)
    }
}

/// The additive key bias `[batch, written.len()]` masking unwritten tokens (`-inf`), `None` when
/// every token is written; f32 on `device` (what attention takes whatever the compute dtype).
fn key_mask(device: &Device, written: &[bool], batch: usize) -> Result<Option<Tensor>> {
    if written.iter().all(|&w| w) {
        return Ok(None);
    }
    let row: Vec<f32> = written
        .iter()
        .map(|&w| if w { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let mask = Tensor::from_vec(row.repeat(batch), &[batch, written.len()])?;
    Ok(Some(device.import_f32(mask)?))
}
