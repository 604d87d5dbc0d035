//! The sequence-parallel side of [`Transformer`]: blocks run on a rank's token shard (or its
//! sub-strip of a PipeFusion patch) with self-attention through a [`SequenceAttention`].

use kernels::Tensor;

use super::Transformer;
use crate::blocks::{AttnMode, KvSlot};
use crate::cond::Conditioning;
use crate::error::{ModelError, Result};
use crate::kv_buffer::KvBuffer;
use crate::sp::SequenceAttention;

impl Transformer {
    /// Sequence parallelism: runs this instance's blocks on this device's token shard
    /// `x: [B, n_r, d]` whose image tokens start at image token `first`; every self-attention
    /// goes through `attn` (Ulysses, Ring, ...), which reaches the other shards. All devices of
    /// the group must call this with the same blocks. MMDiT: one rank's shard also holds the
    /// prompt tokens (SD3: the last rank's, after its image tokens; Flux: the first rank's,
    /// before them), so the ranks' shards in rank order are the serial sequence; the other ranks
    /// run with [`Conditioning::without_prompt`].
    pub fn run_blocks_sequence_parallel(
        &self,
        x: &mut Tensor,
        cond: &Conditioning,
        attn: &mut dyn crate::sp::SequenceAttention,
        first: usize,
    ) -> Result<()> {
        if let Some(m) = &self.mmdit {
            return m.run(
                &self.device,
                x,
                cond,
                crate::mmdit::PartMode::Shared(attn, first),
            );
        }
        cond.check_tokens(x, self.cfg.hidden())?;
        super::bring(&self.device, x)?;
        self.device.install(|| {
            for (layer, (i, block)) in self.range.clone().zip(&self.blocks).enumerate() {
                let _span = tracing::trace_span!("block", i).entered();
                block.forward(
                    &self.device,
                    x,
                    cond,
                    &self.cfg,
                    AttnMode::Shared(&mut *attn, layer),
                )?;
            }
            Ok(())
        })
    }

    /// PipeFusion inside a sequence-parallel group (Ulysses): `x: [B', n_r, d]` is this rank's
    /// sub-strip of the patch whose tokens are `first..first + patch_tokens`; every
    /// self-attention gathers the patch through `attn`, writes its K/V (this rank's heads) into
    /// `kv` (made with [`Transformer::kv_buffer_for_heads`]) and attends to the whole buffer.
    ///
    /// `rank_first` is this rank's first image token (MMDiT's positions; the prompt rows ride
    /// with the rank at the prompt's end of the part, as in
    /// [`run_blocks_sequence_parallel`](Self::run_blocks_sequence_parallel)).
    #[allow(clippy::too_many_arguments)]
    pub fn run_blocks_sequence_parallel_with_kv(
        &self,
        x: &mut Tensor,
        cond: &Conditioning,
        attn: &mut dyn SequenceAttention,
        kv: &mut KvBuffer,
        first: usize,
        patch_tokens: usize,
        rank_first: usize,
    ) -> Result<()> {
        if let Some(m) = &self.mmdit {
            self.check_mmdit_buffer(m, x, kv)?;
            let part = first..first + patch_tokens;
            let mode = crate::mmdit::PartMode::SharedBuffer(attn, kv, rank_first, part);
            return m.run(&self.device, x, cond, mode);
        }
        self.run_on_buffer(x, cond, Some(attn), kv, first, patch_tokens)
    }

    /// An MMDiT slice's buffer must have its layers and the frame's batch.
    fn check_mmdit_buffer(
        &self,
        m: &crate::mmdit::MmditSlice,
        x: &Tensor,
        kv: &KvBuffer,
    ) -> Result<()> {
        if kv.num_layers() != m.kv_layers() || x.dim(0) != kv.dims().0 {
            return Err(ModelError::Input(format!(
                "K/V buffer for {} layers and batch {} does not fit blocks {:?} with batch {}",
                kv.num_layers(),
                kv.dims().0,
                self.range,
                x.dim(0)
            )));
        }
        Ok(())
    }

    /// A K/V buffer holding `1 / head_groups` of the heads (a Ulysses rank's share); `tokens`
    /// as for [`Transformer::kv_buffer`].
    pub fn kv_buffer_for_heads(
        &self,
        batch: usize,
        tokens: usize,
        head_groups: usize,
    ) -> Result<KvBuffer> {
        KvBuffer::new(
            &self.device,
            self.mmdit
                .as_ref()
                .map_or(self.blocks.len(), |m| m.kv_layers()),
            batch,
            tokens,
            self.cfg.hidden() / head_groups.max(1),
        )
    }

    /// The blocks over a K/V buffer for a patch at tokens `first..first + patch_tokens`; `x` is
    /// the patch, or with `attn` this rank's sub-strip of it.
    pub(super) fn run_on_buffer(
        &self,
        x: &mut Tensor,
        cond: &Conditioning,
        mut attn: Option<&mut dyn SequenceAttention>,
        kv: &mut KvBuffer,
        first: usize,
        patch_tokens: usize,
    ) -> Result<()> {
        if let Some(m) = &self.mmdit {
            // (Sequence-parallel MMDiT parts go through run_blocks_sequence_parallel_with_kv.)
            self.check_mmdit_buffer(m, x, kv)?;
            return m.run(
                &self.device,
                x,
                cond,
                crate::mmdit::PartMode::Buffer(kv, first),
            );
        }
        cond.check_tokens(x, self.cfg.hidden())?;
        let (batch, tokens) = kv.dims();
        if kv.num_layers() != self.blocks.len() || x.dim(0) != batch {
            return Err(ModelError::Input(format!(
                "K/V buffer for {} layers and batch {batch} does not fit blocks {:?} with batch {}",
                kv.num_layers(),
                self.range,
                x.dim(0)
            )));
        }
        if first + patch_tokens > tokens {
            return Err(ModelError::Input(format!(
                "patch tokens {first}..{} exceed the image's {tokens} tokens",
                first + patch_tokens
            )));
        }
        kv.mark_written(first, patch_tokens)?;
        super::bring(&self.device, x)?;
        self.device.install(|| {
            for (layer, (i, block)) in self.range.clone().zip(&self.blocks).enumerate() {
                let _span = tracing::trace_span!("block", i).entered();
                let slot = KvSlot {
                    buf: &mut *kv,
                    layer,
                    first,
                    joint: Default::default(),
                };
                let mode = match attn.as_deref_mut() {
                    Some(sp) => AttnMode::SharedBuffer(sp, slot),
                    None => AttnMode::Buffer(slot),
                };
                block.forward(&self.device, x, cond, &self.cfg, mode)?;
            }
            Ok(())
        })
    }
}
