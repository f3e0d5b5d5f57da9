//! The read-path planner: how an op reads an offloaded operand — in place, through a transient
//! copy, or through a prefetched copy — decided in one pure function, [`plan`], from the op, the
//! operand and its model's context. The backend asks it for every op with an offloaded input
//! and does what it says (README's per-op table is this function's; the table test below
//! checks every row of it).
//!
//! Metadata-only ops (reshape of a contiguous view, transpose, permute, slice, expand, flip)
//! never get here: they return offloaded views without reading anything.

use crate::auto::Calibration;
use crate::mode::OffloadMode;

/// What an op does with an offloaded operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `lhs @ W` or `linear(x, W)` with `W` offloaded and `rows` rows in `lhs` (the product of
    /// its dims but the last).
    Matmul {
        /// Rows of `lhs`.
        rows: usize,
    },
    /// `embedding(W, ids)` with the table `W` offloaded.
    Embedding,
    /// Every other op (elementwise, reductions, convolutions, a matmul whose offloaded operand
    /// is the lhs, …): there is no kernel that reads host memory for it.
    Other,
}

/// How an op reads an offloaded operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    /// A kernel reads the operand in host memory (zero-copy). If the target turns the shapes
    /// down at launch, the op falls back to the copy path of its context.
    InPlace,
    /// A transient device copy, made now and dropped after the op.
    Copy,
    /// A transient device copy taken from the context's prefetcher (made ahead of time on a
    /// background thread where the cycle predicted it, else now).
    PrefetchedCopy,
}

/// What the planner knows of the offloaded operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    /// Bytes of the view (what a copy moves).
    pub bytes: u64,
    /// Whether the target's host-reading kernels can read this view on the op's device (on
    /// CUDA: pinned, device-mapped memory of a supported dtype; never for pageable memory).
    pub readable_in_place: bool,
    /// The most rows the target's in-place matmul takes
    /// ([`OffloadTarget::zero_copy_max_rows`](crate::inner::OffloadTarget::zero_copy_max_rows)).
    pub max_rows: usize,
}

/// What the planner knows of the operand's model (its [`OffloadContext`](crate::OffloadContext))
/// on the op's device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Context<'a> {
    /// The mode, after the environment overrides.
    pub mode: OffloadMode,
    /// Reading in place is switched off (`BURN_OFFLOAD_DISABLE_UVA`).
    pub in_place_off: bool,
    /// The calibration `Auto` decides from on this device, if there is one.
    pub calibration: Option<&'a Calibration>,
    /// Whether the context's copies on this device go through its prefetcher (`Prefetch`, or
    /// `Auto` where the calibration says copies overlap compute).
    pub prefetches: bool,
}

/// How `op` reads `operand` under `context`:
///
/// | op | `uva` | `auto` | `copy` | `prefetch` |
/// |---|---|---|---|---|
/// | matmul, rows ≤ max rows | in place | in place where the calibration predicts it faster (always without one), else copy | copy | prefetched copy |
/// | matmul, more rows | copy | copy | copy | prefetched copy |
/// | embedding | in place | in place | copy | in place |
/// | anything else | copy | copy | copy | prefetched copy |
///
/// "copy" is a prefetched copy wherever the context prefetches (`auto` with copies that
/// overlap compute). Nothing reads in place where the target cannot read the operand in place
/// (pageable memory, an unsupported dtype) or where in-place reads are switched off; then the
/// row is "copy" (or "prefetched copy").
pub fn plan(op: OpKind, operand: Operand, context: &Context<'_>) -> ReadPath {
    let copy = if context.prefetches {
        ReadPath::PrefetchedCopy
    } else {
        ReadPath::Copy
    };
    let readable = operand.readable_in_place && !context.in_place_off;
    let in_place = match (op, context.mode) {
        (_, OffloadMode::Copy) | (OpKind::Other, _) => false,
        (
            OpKind::Embedding,
            OffloadMode::Uva | OffloadMode::Auto | OffloadMode::Prefetch { .. },
        ) => readable,
        (OpKind::Matmul { .. }, OffloadMode::Prefetch { .. }) => false,
        (OpKind::Matmul { rows }, OffloadMode::Uva) => readable && rows <= operand.max_rows,
        (OpKind::Matmul { rows }, OffloadMode::Auto) => {
            readable
                && rows <= operand.max_rows
                && context
                    .calibration
                    .is_none_or(|c| c.prefers_zero_copy(rows, operand.bytes))
        }
    };
    if in_place { ReadPath::InPlace } else { copy }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auto::RowRate;
    use ReadPath::{Copy, InPlace, PrefetchedCopy};

    const MAX_ROWS: usize = 16;
    const PREFETCH: OffloadMode = OffloadMode::prefetch(1 << 20);

    /// Upload 10 GB/s + 1 ms; in place 20 GB/s at 1 row, halving per doubling; GEMM 100 GB/s:
    /// a 4 MiB weight is read in place up to 4 rows.
    fn calibration(copies_overlap_compute: bool) -> Calibration {
        Calibration {
            upload_latency_s: 1e-3,
            upload_bytes_per_s: 10e9,
            rows: (0..5)
                .map(|i| RowRate {
                    rows: 1 << i,
                    zero_copy_bytes_per_s: 20e9 / f64::from(1 << i),
                    device_matmul_bytes_per_s: 100e9,
                })
                .collect(),
            copies_overlap_compute,
            weight_bytes: 16 << 20,
            seconds: 0.0,
        }
    }

    fn operand(readable_in_place: bool) -> Operand {
        Operand {
            bytes: 4 << 20,
            readable_in_place,
            max_rows: MAX_ROWS,
        }
    }

    /// The context of a policy in `mode` (what `apply` sets up: `Prefetch` always prefetches,
    /// `Auto` where its calibration overlaps copies).
    fn context(mode: OffloadMode, in_place_off: bool, c: Option<&Calibration>) -> Context<'_> {
        let prefetches = match mode {
            OffloadMode::Prefetch { .. } => true,
            OffloadMode::Auto => c.is_some_and(|c| c.copies_overlap_compute),
            OffloadMode::Uva | OffloadMode::Copy => false,
        };
        Context {
            mode,
            in_place_off,
            calibration: c,
            prefetches,
        }
    }

    const SMALL: OpKind = OpKind::Matmul { rows: 1 };
    const LARGE: OpKind = OpKind::Matmul { rows: MAX_ROWS + 1 };

    /// README's per-op table, row by row: (op, uva, auto without calibration, copy, prefetch).
    #[test]
    fn the_per_op_table_of_the_readme() {
        let rows = [
            (SMALL, InPlace, InPlace, Copy, PrefetchedCopy),
            (LARGE, Copy, Copy, Copy, PrefetchedCopy),
            (OpKind::Embedding, InPlace, InPlace, Copy, InPlace),
            (OpKind::Other, Copy, Copy, Copy, PrefetchedCopy),
        ];
        for (op, uva, auto, copy, prefetch) in rows {
            for (mode, want) in [
                (OffloadMode::Uva, uva),
                (OffloadMode::Auto, auto),
                (OffloadMode::Copy, copy),
                (PREFETCH, prefetch),
            ] {
                let got = plan(op, operand(true), &context(mode, false, None));
                assert_eq!(got, want, "{op:?} in {mode}");
            }
        }
    }

    /// Pageable memory (or a dtype the kernels do not take): nothing reads in place.
    #[test]
    fn pageable_memory_is_always_copied() {
        for mode in [
            OffloadMode::Uva,
            OffloadMode::Auto,
            OffloadMode::Copy,
            PREFETCH,
        ] {
            for op in [SMALL, LARGE, OpKind::Embedding, OpKind::Other] {
                let got = plan(op, operand(false), &context(mode, false, None));
                let want = if mode == PREFETCH {
                    PrefetchedCopy
                } else {
                    Copy
                };
                assert_eq!(got, want, "{op:?} in {mode}");
            }
        }
    }

    /// `BURN_OFFLOAD_DISABLE_UVA`: `uva` and `auto` arrive here as `copy` (the context's mode
    /// after the override); `prefetch` stays, and copies embedding tables too.
    #[test]
    fn in_place_reads_switched_off() {
        let effective = |mode| {
            if matches!(mode, OffloadMode::Prefetch { .. }) {
                mode
            } else {
                OffloadMode::Copy
            }
        };
        for mode in [OffloadMode::Uva, OffloadMode::Auto, OffloadMode::Copy] {
            for op in [SMALL, LARGE, OpKind::Embedding, OpKind::Other] {
                let got = plan(op, operand(true), &context(effective(mode), true, None));
                assert_eq!(got, Copy, "{op:?} in {mode}");
            }
        }
        for op in [SMALL, LARGE, OpKind::Embedding, OpKind::Other] {
            let got = plan(op, operand(true), &context(PREFETCH, true, None));
            assert_eq!(got, PrefetchedCopy, "{op:?}");
        }
        // Even a context that kept `uva` never reads in place once switched off.
        let got = plan(SMALL, operand(true), &context(OffloadMode::Uva, true, None));
        assert_eq!(got, Copy);
    }

    /// `auto` with a calibration: in place where predicted faster, and its copies prefetched
    /// where the calibration says copies overlap compute.
    #[test]
    fn auto_follows_its_calibration() {
        for overlap in [false, true] {
            let c = calibration(overlap);
            let ctx = context(OffloadMode::Auto, false, Some(&c));
            let copy = if overlap { PrefetchedCopy } else { Copy };
            for (rows, want) in [(1, InPlace), (4, InPlace), (8, copy), (MAX_ROWS + 1, copy)] {
                let got = plan(OpKind::Matmul { rows }, operand(true), &ctx);
                assert_eq!(got, want, "{rows} rows, overlap {overlap}");
            }
            // A tiny weight: the upload's fixed cost makes in place win at every measured row
            // count, up to the kernel's limit.
            let tiny = Operand {
                bytes: 4 << 10,
                ..operand(true)
            };
            assert_eq!(plan(OpKind::Matmul { rows: 16 }, tiny, &ctx), InPlace);
            assert_eq!(plan(OpKind::Embedding, operand(true), &ctx), InPlace);
            assert_eq!(plan(OpKind::Other, operand(true), &ctx), copy);
        }
    }
}
