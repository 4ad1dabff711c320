//! Loading and attaching the kernel program.
use std::path::Path;

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use observer_ebpf::{Counter, FlowKey, FlowValue, MAX_REASONS, ProgramConfig, SampleEvent};

use super::btf::KernelBtf;
use super::drain::DrainState;
use super::tracefs::{self, KfreeSkbFields, ReasonTable};
use super::{CaptureConfig, CaptureError, ReasonFilter, Sample, decode};

/// The object built by `observer/build.rs` (aya-build) from `observer-ebpf`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/deny-observer-ebpf"));

/// The attached `skb:kfree_skb` program and its maps. Dropping it detaches the program.
pub struct Capture {
    // Owns the program (and with it the attachment); maps are taken out of it below.
    _ebpf: Ebpf,
    pub(super) flows: PerCpuHashMap<MapData, FlowKey, FlowValue>,
    pub(super) totals: PerCpuArray<MapData, Counter>,
    pub(super) losses: PerCpuArray<MapData, u64>,
    samples: RingBuf<MapData>,
    pub(super) reasons: ReasonTable,
    pub(super) state: DrainState,
    pub(super) capacity: u32,
    pub(super) idle_drains: u32,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("capacity", &self.capacity)
            .field("reasons", &self.reasons.len())
            .finish_non_exhaustive()
    }
}

/// Drop-reason names of the running kernel: the format file's `__print_symbolic` list, else
/// the BTF enum `skb_drop_reason`; kernels without a `reason` field get [`ReasonTable::unknown_only`].
pub fn kernel_reasons(
    fmt: &tracefs::TracepointFormat,
    fields: &KfreeSkbFields,
    btf: &KernelBtf,
) -> Result<ReasonTable, CaptureError> {
    if fields.reason.is_none() {
        return Ok(ReasonTable::unknown_only());
    }
    if let Some(t) = tracefs::parse_reason_symbols(&fmt.print_fmt) {
        return Ok(t);
    }
    let values = btf.enum_values("skb_drop_reason")?;
    Ok(ReasonTable::from_kernel_names(
        values.iter().map(|(n, v)| (*v, n.as_str())),
    ))
}

/// Turns a [`ReasonFilter`] into the program's `(all_reasons, reason_mask)`.
pub fn reason_mask(
    filter: &ReasonFilter,
    table: &ReasonTable,
) -> Result<(u32, [u64; (MAX_REASONS / 64) as usize]), CaptureError> {
    let mut mask = [0u64; (MAX_REASONS / 64) as usize];
    let names = match filter {
        ReasonFilter::All => return Ok((1, mask)),
        ReasonFilter::Names(names) => names,
    };
    if names.is_empty() {
        return Err(CaptureError::Config(
            "the reason filter lists no reasons; use ReasonFilter::All to count every reason"
                .to_owned(),
        ));
    }
    let mut unknown = Vec::new();
    for name in names {
        match table.number(name) {
            Some(n) if n < MAX_REASONS => {
                if let Some(w) = mask.get_mut((n / 64) as usize) {
                    *w |= 1u64 << (n % 64);
                }
            }
            Some(n) => {
                return Err(CaptureError::ReasonOutOfRange {
                    name: name.clone(),
                    number: n,
                    max: MAX_REASONS,
                });
            }
            None => unknown.push(name.clone()),
        }
    }
    if !unknown.is_empty() {
        let valid = table
            .iter()
            .map(|(_, l)| l.as_ref())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(CaptureError::UnknownReasons { unknown, valid });
    }
    Ok((0, mask))
}

fn validate(config: &CaptureConfig) -> Result<(), CaptureError> {
    if config.flow_map_entries == 0 {
        return Err(CaptureError::Config(
            "flow_map_entries must be at least 1".to_owned(),
        ));
    }
    // SAFETY: sysconf has no preconditions.
    let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let rb = config.ringbuf_bytes;
    if !rb.is_power_of_two() || !rb.is_multiple_of(page) {
        return Err(CaptureError::Config(format!(
            "ringbuf_bytes {rb} must be a power of two and a multiple of the page size {page}"
        )));
    }
    Ok(())
}

impl Capture {
    /// Mounts tracefs/bpffs if needed, computes the kernel layout, loads the program with
    /// `config`, and attaches it to `skb:kfree_skb`.
    pub fn load(config: &CaptureConfig) -> Result<Self, CaptureError> {
        validate(config)?;
        tracefs::ensure_mounted()?;
        let fmt = tracefs::read_kfree_skb_format(Path::new(tracefs::TRACEFS_ROOT))?;
        let fields = KfreeSkbFields::from_format(&fmt)?;
        let btf = KernelBtf::vmlinux()?;
        let layout = btf.kernel_layout(&fields)?;
        let reasons = kernel_reasons(&fmt, &fields, &btf)?;
        let (all_reasons, mask) = reason_mask(&config.reasons, &reasons)?;
        let program_config = ProgramConfig {
            layout,
            all_reasons,
            netns_filter: config.netns.unwrap_or(0),
            reason_mask: mask,
        };
        tracing::debug!(
            ?program_config,
            reasons = reasons.len(),
            "loading kfree_skb program"
        );

        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &program_config, true)
            .map_max_entries("FLOWS", config.flow_map_entries)
            .map_max_entries("SAMPLES", config.ringbuf_bytes)
            .load(EBPF_OBJECT)?;
        let program: &mut TracePoint = ebpf
            .program_mut("kfree_skb")
            .ok_or(CaptureError::Missing("program kfree_skb"))?
            .try_into()?;
        program.load()?;
        program.attach("skb", "kfree_skb")?;

        let map_err = |map: &'static str| move |source| CaptureError::Map { map, source };
        let flows = PerCpuHashMap::try_from(
            ebpf.take_map("FLOWS")
                .ok_or(CaptureError::Missing("map FLOWS"))?,
        )
        .map_err(map_err("FLOWS"))?;
        let totals = PerCpuArray::try_from(
            ebpf.take_map("TOTALS")
                .ok_or(CaptureError::Missing("map TOTALS"))?,
        )
        .map_err(map_err("TOTALS"))?;
        let losses = PerCpuArray::try_from(
            ebpf.take_map("LOSSES")
                .ok_or(CaptureError::Missing("map LOSSES"))?,
        )
        .map_err(map_err("LOSSES"))?;
        let samples = RingBuf::try_from(
            ebpf.take_map("SAMPLES")
                .ok_or(CaptureError::Missing("map SAMPLES"))?,
        )
        .map_err(map_err("SAMPLES"))?;
        let state = DrainState::new(&reasons);
        Ok(Self {
            _ebpf: ebpf,
            flows,
            totals,
            losses,
            samples,
            reasons,
            state,
            capacity: config.flow_map_entries,
            idle_drains: config.idle_drains,
        })
    }

    /// The running kernel's drop reasons, as this capture labels them.
    pub fn reasons(&self) -> &ReasonTable {
        &self.reasons
    }

    /// Takes every sample waiting in the ring buffer, without blocking.
    pub fn samples(&mut self) -> Vec<Sample> {
        let mut out = Vec::new();
        while let Some(item) = self.samples.next() {
            let Some(ev) = parse_sample(&item) else {
                continue;
            };
            let reason = self.state.label(&self.reasons, ev.key.reason);
            let drop = decode(&ev.key, reason, 1, u64::from(ev.len));
            out.push(Sample {
                drop,
                ts_ns: ev.ts_ns,
                location: ev.location,
                ifindex: ev.ifindex,
                src_port: ev.src_port,
                tcp_flags: ev.tcp_flags,
            });
        }
        out
    }
}

fn parse_sample(bytes: &[u8]) -> Option<SampleEvent> {
    if bytes.len() < std::mem::size_of::<SampleEvent>() {
        return None;
    }
    // SAFETY: SampleEvent is a #[repr(C)] Pod (any bit pattern is valid) and the buffer holds
    // at least size_of::<SampleEvent>() bytes; read_unaligned copes with any alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<SampleEvent>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ReasonTable {
        ReasonTable::from_kernel_names([
            (2, "NOT_SPECIFIED"),
            (12, "NETFILTER_DROP"),
            (73, "TC_INGRESS"),
        ])
    }

    #[test]
    fn all_sets_flag() {
        assert_eq!(reason_mask(&ReasonFilter::All, &table()).unwrap().0, 1);
    }

    #[test]
    fn names_set_bits() {
        let f = ReasonFilter::Names(vec!["netfilter_drop".into(), "TC_INGRESS".into()]);
        let (all, mask) = reason_mask(&f, &table()).unwrap();
        assert_eq!(all, 0);
        assert_eq!(mask[0], 1 << 12);
        assert_eq!(mask[1], 1 << (73 - 64));
        assert!(mask[2..].iter().all(|w| *w == 0));
    }

    #[test]
    fn unknown_names_list_valid_ones() {
        let f = ReasonFilter::Names(vec!["netfilter_drop".into(), "bogus_reason".into()]);
        let err = reason_mask(&f, &table()).unwrap_err().to_string();
        assert!(err.contains("bogus_reason"), "{err}");
        assert!(err.contains("netfilter_drop, tc_ingress"), "{err}");
    }

    #[test]
    fn empty_list_is_rejected() {
        assert!(reason_mask(&ReasonFilter::Names(vec![]), &table()).is_err());
    }

    #[test]
    fn ringbuf_size_is_validated() {
        let cfg = CaptureConfig {
            ringbuf_bytes: 1000,
            ..CaptureConfig::default()
        };
        assert!(matches!(validate(&cfg), Err(CaptureError::Config(_))));
        assert!(validate(&CaptureConfig::default()).is_ok());
    }
}
