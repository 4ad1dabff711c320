//! Turning a run's [`Results`] into the terminal table, the JSON file and the PASS/FAIL
//! targets of issue 6.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{Config, LogLoss, Results, Session, Window};

/// Ratio to the limit the daemon must reach.
const RATIO_TARGET: f64 = 0.9;
/// Longest acceptable time from a drop to the counter.
const LATENCY_TARGET_S: f64 = 1.0;
/// Observer CPU budget, in core-seconds per million drops.
const CPU_TARGET: f64 = 0.05;
/// Series of `deny_observer_drops_total` a 50,000-port scan may leave, at most (in fact a
/// handful: it is one source and one destination workload).
const SCAN_SERIES_BOUND: usize = 10;

/// Median, minimum and maximum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

impl Spread {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    fn json(self) -> Value {
        json!({ "median": self.median, "min": self.min, "max": self.max })
    }
}

/// Per configuration and scenario.
#[derive(Clone, Debug)]
struct ScenarioStats {
    rate: Option<Spread>,
    /// Per-round ratio to the limit's window of the same round.
    ratio: Option<Spread>,
    counted: Option<u64>,
    lost: Option<u64>,
    actual: u64,
    /// Windows whose counts differ from the truth.
    inexact: usize,
    cpu_s: Option<f64>,
    /// eBPF run time per program run, over rounds.
    ns_per_drop: Option<Spread>,
    /// The daemon's and the one-liner's run time measured on the same floods, over rounds.
    paired: Option<Paired>,
}

/// eBPF run time per program run of deny-observer and of the bpftrace one-liner attached
/// together (see [`crate::Session::paired_ns`]), over rounds.
#[derive(Clone, Copy, Debug)]
struct Paired {
    /// Per round, the geometric mean of both attach orders where the round has both.
    ours: Spread,
    theirs: Spread,
    /// Per-round ratio, deny-observer's over the one-liner's (of the means above).
    ratio: Spread,
    /// The ratio with the daemon attached first, and with the one-liner first.
    daemon_first: Option<Spread>,
    one_liner_first: Option<Spread>,
}

/// One round's `(deny-observer, one-liner)` ns per run, with the daemon attached first and
/// with the one-liner first.
type RoundPairs = (Option<(f64, f64)>, Option<(f64, f64)>);

impl Paired {
    /// From each round's pair with the daemon first and pair with the one-liner first.
    fn of(rounds: &[RoundPairs]) -> Option<Self> {
        // Each order favours the program that runs second, so a round measured both ways is
        // judged by their geometric mean; a round missing one order is judged by the order it has.
        let pairs: Vec<(f64, f64)> = rounds
            .iter()
            .filter_map(|r| match *r {
                (Some(a), Some(b)) => Some(((a.0 * b.0).sqrt(), (a.1 * b.1).sqrt())),
                (a, b) => a.or(b),
            })
            .collect();
        let col = |f: fn(&(f64, f64)) -> f64| pairs.iter().map(f).collect::<Vec<_>>();
        let ratios = |pick: fn(&RoundPairs) -> Option<(f64, f64)>| {
            Spread::of(
                &rounds
                    .iter()
                    .filter_map(pick)
                    .map(|p| p.0 / p.1)
                    .collect::<Vec<_>>(),
            )
        };
        Some(Self {
            ours: Spread::of(&col(|p| p.0))?,
            theirs: Spread::of(&col(|p| p.1))?,
            ratio: Spread::of(&col(|p| p.0 / p.1))?,
            daemon_first: ratios(|r| r.0),
            one_liner_first: ratios(|r| r.1),
        })
    }
}

/// Per configuration.
#[derive(Clone, Debug)]
struct ConfigStats {
    config: Config,
    scenarios: Vec<ScenarioStats>,
    /// Worst scenario's median ratio.
    ratio_to_limit: Option<f64>,
    accuracy: Option<f64>,
    cpu_per_million: Option<f64>,
    /// The costliest scenario's eBPF ns/drop (highest median).
    ns_per_drop: Option<Spread>,
    peak_rss: Option<u64>,
    /// Latency bursts: seconds of those that showed up, and how many never did.
    latency: Option<Spread>,
    latency_missing: usize,
    idle_cpu: Option<f64>,
    /// log-tail: what the kernel log path lost, summed over sessions, and the session-wide
    /// `(counted, actual)`.
    log_loss: Option<(LogLoss, u64, u64)>,
}

/// A PASS/FAIL line.
#[derive(Clone, Debug)]
pub struct Target {
    /// What is checked.
    pub name: String,
    /// Met or not; `None` when it could not be measured in this run.
    pub pass: Option<bool>,
    /// The numbers behind it.
    pub detail: String,
}

/// The computed report.
pub struct Report<'a> {
    results: &'a Results,
    configs: Vec<ConfigStats>,
    /// The targets.
    pub targets: Vec<Target>,
}

fn sessions_of(results: &Results, config: Config) -> Vec<&Session> {
    results
        .rounds
        .iter()
        .flat_map(|r| r.iter().filter(|(c, _)| *c == config).map(|(_, s)| s))
        .collect()
}

fn limit_window(results: &Results, round: usize, scenario: usize) -> Option<&Window> {
    results
        .rounds
        .get(round)?
        .iter()
        .find(|(c, _)| *c == Config::Limit)
        .and_then(|(_, s)| s.windows.get(scenario))
}

impl<'a> Report<'a> {
    /// Computes the statistics and targets.
    pub fn new(results: &'a Results) -> Self {
        let configs: Vec<ConfigStats> = results
            .configs
            .iter()
            .map(|&c| config_stats(results, c))
            .collect();
        let mut report = Self {
            results,
            configs,
            targets: Vec::new(),
        };
        report.targets = report.compute_targets();
        report
    }

    fn config(&self, c: Config) -> Option<&ConfigStats> {
        self.configs.iter().find(|s| s.config == c)
    }

    fn compute_targets(&self) -> Vec<Target> {
        let r = self.results;
        let mut t = Vec::new();
        let Some(d) = self.config(Config::Daemon) else {
            t.push(Target {
                name: "deny-observer targets".into(),
                pass: None,
                detail: "deny-observer was not among --configs".into(),
            });
            return t;
        };
        for (i, s) in r.scenarios.iter().enumerate() {
            let st = &d.scenarios[i];
            let exact = st.counted == Some(st.actual) && st.inexact == 0;
            let label = if s.flows > super::FEW_FLOWS {
                format!(
                    "accuracy 1.0, {} ({} flows = map size with the few-flow keys)",
                    s.name, s.flows
                )
            } else {
                format!("accuracy 1.0, {} ({} flows)", s.name, s.flows)
            };
            t.push(Target {
                name: label,
                pass: Some(exact),
                detail: format!(
                    "counted {} of {} over all rounds; {} window(s) inexact; lost to flow-map eviction meanwhile (whole node): {}",
                    st.counted.map_or("-".into(), |c| c.to_string()),
                    st.actual,
                    st.inexact,
                    st.lost.map_or("-".into(), |c| c.to_string()),
                ),
            });
        }
        if let Some(o) = &r.overflow {
            // The eviction loss is one node-wide counter (it cannot say whose flows were
            // evicted), so it adds up with what was attributed on the whole node to the
            // kernel's exact totals; the bench's own drops tie those totals to nftables.
            t.push(Target {
                name: format!(
                    "beyond the map ({} flows, {} entries): counted + lost == actual",
                    o.flows, o.map_entries
                ),
                pass: Some(o.counted_all + o.lost == o.kernel_all && o.foreign >= 0),
                detail: format!(
                    "node-wide: counted {} + lost {} = {} vs {} kernel drops; the bench's flows: \
                     counted {} of nft's {}, kernel netfilter_drop total {}{}",
                    o.counted_all,
                    o.lost,
                    o.counted_all + o.lost,
                    o.kernel_all,
                    o.counted,
                    o.actual,
                    o.actual as i64 + o.foreign,
                    if o.foreign > 0 {
                        format!(
                            "; {} foreign netfilter drops on the node meanwhile",
                            o.foreign
                        )
                    } else {
                        String::new()
                    }
                ),
            });
        }
        if self.config(Config::Limit).is_some() {
            t.push(Target {
                name: format!("ratio to the limit >= {RATIO_TARGET} (worst scenario)"),
                pass: d.ratio_to_limit.map(|x| x >= RATIO_TARGET),
                detail: fmt_opt(d.ratio_to_limit, 3),
            });
        }
        t.extend(crate::connections::targets(r));
        if let (Some(b), true) = (
            self.config(Config::Bpftrace),
            self.config(Config::Limit).is_some(),
        ) {
            let per_scenario: Vec<String> = r
                .scenarios
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    format!(
                        "{} {} vs {}",
                        s.name,
                        fmt_opt(d.scenarios[i].ratio.map(|x| x.median), 3),
                        fmt_opt(b.scenarios[i].ratio.map(|x| x.median), 3)
                    )
                })
                .collect();
            t.push(Target {
                name: "no worse than bpftrace (ratio to limit, worst scenario)".into(),
                pass: match (d.ratio_to_limit, b.ratio_to_limit) {
                    (Some(x), Some(y)) => Some(x >= y),
                    _ => None,
                },
                detail: format!(
                    "deny-observer {} vs bpftrace {} ({}); eBPF ns/drop of the costliest scenario {} vs {}",
                    fmt_opt(d.ratio_to_limit, 3),
                    fmt_opt(b.ratio_to_limit, 3),
                    per_scenario.join(", "),
                    fmt_opt(d.ns_per_drop.map(|x| x.median), 1),
                    fmt_opt(b.ns_per_drop.map(|x| x.median), 1)
                ),
            });
        }
        if let Some(b) = self.config(Config::Bpftrace) {
            // Scenario by scenario: the cost per drop depends on the traffic (the number of
            // flow keys), so each is compared with the one-liner's under the same traffic.
            let pairs: Vec<(Option<Spread>, Option<Spread>)> = d
                .scenarios
                .iter()
                .zip(&b.scenarios)
                .map(|(x, y)| (x.ns_per_drop, y.ns_per_drop))
                .collect();
            let ratio_spread = |x: Option<Spread>| {
                x.map_or("-".into(), |x| {
                    format!("{:.3} ({:.3}-{:.3})", x.median, x.min, x.max)
                })
            };
            let spread = |x: Option<Spread>| {
                x.map_or("-".into(), |x| {
                    format!("{:.1} ({:.1}-{:.1})", x.median, x.min, x.max)
                })
            };
            let separate = r
                .scenarios
                .iter()
                .zip(&pairs)
                .map(|(s, (x, y))| format!("{} {} vs {}", s.name, spread(*x), spread(*y)))
                .collect::<Vec<_>>()
                .join(", ");
            // The paired figures decide when every scenario has them: the same drops and the
            // same moment for both programs. Separate sessions are minutes apart on a shared
            // machine, where a program's cost moved by a third between rounds.
            let paired: Option<Vec<Paired>> = d.scenarios.iter().map(|s| s.paired).collect();
            let (pass, detail) = match paired {
                Some(p) if !p.is_empty() => (
                    Some(p.iter().all(|p| p.ratio.median <= 1.0)),
                    format!(
                        "same floods, both attached, each round in both attach orders (geometric mean), median (min-max) over rounds, deny-observer vs bpftrace: {}; in separate sessions: {}",
                        r.scenarios
                            .iter()
                            .zip(&p)
                            .map(|(s, p)| format!(
                                "{} {} vs {}, ratio {:.3} ({:.3}-{:.3}; daemon first {}, one-liner first {})",
                                s.name,
                                spread(Some(p.ours)),
                                spread(Some(p.theirs)),
                                p.ratio.median,
                                p.ratio.min,
                                p.ratio.max,
                                ratio_spread(p.daemon_first),
                                ratio_spread(p.one_liner_first),
                            ))
                            .collect::<Vec<_>>()
                            .join(", "),
                        separate
                    ),
                ),
                _ => (
                    pairs
                        .iter()
                        .map(|(x, y)| Some(x.as_ref()?.median <= y.as_ref()?.median))
                        .collect::<Option<Vec<bool>>>()
                        .map(|each| each.iter().all(|&p| p)),
                    format!("median (min-max) over rounds, deny-observer vs bpftrace: {separate}"),
                ),
            };
            t.push(Target {
                name: "eBPF ns/drop <= bpftrace one-liner's (every scenario)".into(),
                pass,
                detail,
            });
        }
        t.push(Target {
            name: format!("drop -> counter <= {LATENCY_TARGET_S} s (worst burst)"),
            pass: match (d.latency, d.latency_missing) {
                (Some(l), 0) => Some(l.max <= LATENCY_TARGET_S),
                (_, missing) if missing > 0 => Some(false),
                _ => None,
            },
            detail: format!(
                "{} bursts of {} datagrams: median {} s, worst {} s{}",
                r.rounds.len() * super::BURSTS,
                super::BURST,
                fmt_opt(d.latency.map(|l| l.median), 3),
                fmt_opt(d.latency.map(|l| l.max), 3),
                if d.latency_missing > 0 {
                    format!(
                        "; {} never showed within {} s",
                        d.latency_missing,
                        super::CATCH_UP.as_secs()
                    )
                } else {
                    String::new()
                }
            ),
        });
        t.push(Target {
            name: format!("observer CPU <= {CPU_TARGET} core-s per million drops"),
            pass: d.cpu_per_million.map(|x| x <= CPU_TARGET),
            detail: format!(
                "{} core-s per million drops (all windows; idle cost {} core-s/s){}",
                fmt_opt(d.cpu_per_million, 4),
                fmt_opt(d.idle_cpu, 4),
                d.scenarios
                    .iter()
                    .zip(&r.scenarios)
                    .map(|(st, s)| format!(
                        ", {} {}",
                        s.name,
                        fmt_opt(st.cpu_s.map(|c| c / (st.actual.max(1) as f64 / 1e6)), 4)
                    ))
                    .collect::<String>()
            ),
        });
        if let Some(p) = &r.port_scan {
            t.push(Target {
                name: format!("{}-port scan makes a bounded number of series", p.ports),
                pass: Some(p.series_dst <= SCAN_SERIES_BOUND),
                detail: format!(
                    "{} series for the scanned workload, {} deny_observer_drops_total series on the node, /metrics {} bytes; counted {} of {} SYNs",
                    p.series_dst, p.series_total, p.metrics_bytes, p.counted, p.actual
                ),
            });
        }
        t
    }

    /// The terminal table.
    pub fn text(&self) -> String {
        let r = self.results;
        let mut o = String::new();
        let _ = writeln!(o, "\ndeny-observer bench: {}", r.machine);
        let _ = writeln!(
            o,
            "{} round(s), configurations interleaved (order rotated each round), {} s windows, {} sender thread(s), {} s wall\n",
            r.rounds.len(),
            r.window.as_secs_f64(),
            r.threads,
            r.wall.as_secs()
        );
        let _ = writeln!(
            o,
            "{:<9} {:<14} {:>26} {:>7} {:>10} {:>10} {:>9} {:>8}",
            "scenario",
            "config",
            "drops/s median (min-max)",
            "ratio",
            "accuracy",
            "evicted",
            "cpu s/M",
            "ns/drop"
        );
        for (i, s) in r.scenarios.iter().enumerate() {
            for c in &self.configs {
                let st = &c.scenarios[i];
                let rate = st.rate.map_or("-".into(), |x| {
                    format!("{} ({}-{})", si(x.median), si(x.min), si(x.max))
                });
                let accuracy = match (c.config, st.counted) {
                    (Config::Daemon, Some(n)) => {
                        format!("{:.4}", n as f64 / st.actual.max(1) as f64)
                    }
                    _ => "-".into(),
                };
                let lost = st.lost.map_or("-".into(), |l| l.to_string());
                let cpu = st.cpu_s.map_or("-".into(), |c| {
                    format!("{:.4}", c / (st.actual.max(1) as f64 / 1e6))
                });
                let _ = writeln!(
                    o,
                    "{:<9} {:<14} {:>26} {:>7} {:>10} {:>10} {:>9} {:>8}",
                    s.name,
                    c.config.name(),
                    rate,
                    fmt_opt(st.ratio.map(|x| x.median), 3),
                    accuracy,
                    lost,
                    cpu,
                    fmt_opt(st.ns_per_drop.map(|x| x.median), 1)
                );
            }
        }
        let _ = writeln!(
            o,
            "\n{:<14} {:>14} {:>10} {:>14} {:>10} {:>13} {:>11} {:>16}",
            "config",
            "ratio_to_limit",
            "accuracy",
            "cpu s/M drops",
            "idle cpu",
            "eBPF ns/drop",
            "peak RSS",
            "latency med/max"
        );
        for c in &self.configs {
            let _ = writeln!(
                o,
                "{:<14} {:>14} {:>10} {:>14} {:>10} {:>13} {:>11} {:>16}",
                c.config.name(),
                fmt_opt(c.ratio_to_limit, 3),
                fmt_opt(c.accuracy, 4),
                fmt_opt(c.cpu_per_million, 4),
                fmt_opt(c.idle_cpu, 4),
                fmt_opt(c.ns_per_drop.map(|x| x.median), 1),
                c.peak_rss
                    .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
                c.latency
                    .map_or("-".into(), |l| format!("{:.2}/{:.2} s", l.median, l.max))
            );
        }
        let _ = writeln!(
            o,
            "\nratio: per-round drops/s over the limit's in the same round, median; ratio_to_limit: worst scenario.\n\
             accuracy: deny-observer = its deny_observer_drops_total for source {}/{} -> destination {}/{}, reason netfilter_drop,\n\
             over the nft drop counter; bpftrace = its NETFILTER_DROP ({}) count over the nft counter for the whole session\n\
             (it counts the whole machine, so other traffic's netfilter drops push it above 1); log-tail = LOG lines it read\n\
             for sender -> destination over the nft counter for the whole session.\n\
             latency: from the last of {} datagrams until /metrics shows them all ({} bursts per session, polled every 10 ms).\n\
             evicted: deny_observer_events_lost_total{{stage=\"flow_map_evicted\"}} during the windows (whole node).\n\
             cpu: observer CPU time (sum of its threads' schedstat, ns) per million drops (windows: flood plus one drain, no scraping meanwhile).\n\
             ns/drop (eBPF): run_time_ns/run_cnt of the observer's programs over a 1 s flood of each scenario with\n\
             kernel.bpf_stats_enabled=1, median over rounds (stats are off while throughput is measured); the summary\n\
             shows the costliest scenario's, and the target compares every scenario with bpftrace's in the same scenario:\n\
             when both ran, each daemon session also floods each scenario for 1 s with the one-liner attached next to\n\
             the daemon (every drop runs both programs), once attached after the daemon and once before a daemon of its\n\
             own (the program that runs first pays the cache misses the second finds warm); the median over rounds of the\n\
             per-round ratio of the two orders' geometric means decides.\n\
             log-tail (kube-iptables-tailer style, no targets): while it runs, the destination's nft drop rule also does\n\
             `log prefix \"{}\"` (LOG before DROP, no rate limit; nf_log_all_netns=1), and a tailer process\n\
             (`cargo xtask log-tail`) reads /dev/kmsg and counts per (src, dst, proto, dport); its cpu is the tailer's only\n\
             (the kernel formats each line in the packet path, which shows in its ratio), measured until it goes idle.",
            super::SRC_NAMESPACE,
            super::SRC_WORKLOAD,
            super::DST_NAMESPACE,
            super::DST_WORKLOAD,
            r.netfilter_drop,
            super::BURST,
            super::BURSTS,
            super::logtail::LOG_PREFIX
        );
        for c in &self.configs {
            if let Some((l, counted, actual)) = c.log_loss {
                let _ = writeln!(
                    o,
                    "\nlog-tail: counted {counted} of {actual} drops ({}); kernel log records overwritten before the tailer read them: {} \
                     (any source, {} EPIPE overruns); callbacks suppressed: {}; unparsed prefixed lines: {}; not accounted for: {}",
                    fmt_opt(c.accuracy, 4),
                    l.lost_records,
                    l.overruns,
                    l.suppressed,
                    l.unparsed,
                    actual as i64 - counted as i64 - l.lost_records as i64
                );
            }
        }
        if let Some(ov) = &r.overflow {
            let _ = writeln!(
                o,
                "\noverflow: {} UDP flows into a {}-entry flow map (drop cache off, 4 KiB ring buffer): the bench's flows: actual {}, counted {}; \
                 node-wide: counted {} + lost {} (flow_map_evicted) = {} vs kernel totals {}",
                ov.flows,
                ov.map_entries,
                ov.actual,
                ov.counted,
                ov.counted_all,
                ov.lost,
                ov.counted_all + ov.lost,
                ov.kernel_all
            );
        }
        if let Some(p) = &r.port_scan {
            let _ = writeln!(
                o,
                "port scan: {} SYNs to {} distinct ports: counted {} of {}; deny_observer_drops_total series: {} for the target, {} on the node; /metrics {} bytes; daemon peak RSS {:.1} MiB",
                p.actual,
                p.ports,
                p.counted,
                p.actual,
                p.series_dst,
                p.series_total,
                p.metrics_bytes,
                p.peak_rss as f64 / 1048576.0
            );
        }
        let _ = writeln!(o, "\ntargets:");
        for t in &self.targets {
            let verdict = match t.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "N/A ",
            };
            let _ = writeln!(o, "  {verdict}  {}: {}", t.name, t.detail);
        }
        o
    }

    /// The JSON document.
    pub fn json_string(&self) -> anyhow::Result<String> {
        let r = self.results;
        let configurations: Vec<Value> = self
            .configs
            .iter()
            .map(|c| {
                let scenarios: serde_json::Map<String, Value> = r
                    .scenarios
                    .iter()
                    .zip(&c.scenarios)
                    .map(|(s, st)| {
                        (
                            s.name.to_owned(),
                            json!({
                                "kind": s.kind.name(),
                                "flows": s.flows,
                                "drops_per_second": st.rate.map(Spread::json),
                                "ratio_to_limit": st.ratio.map(Spread::json),
                                "actual": st.actual,
                                "counted": st.counted,
                                "accuracy": st.counted.map(|n| n as f64 / st.actual.max(1) as f64),
                                "evicted_packets": st.lost,
                                "observer_cpu_seconds": st.cpu_s,
                                "ebpf_ns_per_drop": st.ns_per_drop.map(Spread::json),
                                "ebpf_ns_per_drop_paired": st.paired.map(|p| json!({
                                    "deny_observer": p.ours.json(),
                                    "bpftrace": p.theirs.json(),
                                    "ratio": p.ratio.json(),
                                    "ratio_daemon_first": p.daemon_first.map(Spread::json),
                                    "ratio_one_liner_first": p.one_liner_first.map(Spread::json),
                                })),
                            }),
                        )
                    })
                    .collect();
                json!({
                    "name": c.config.name(),
                    "ratio_to_limit": c.ratio_to_limit,
                    "accuracy": c.accuracy,
                    "cpu_seconds_per_million_drops": c.cpu_per_million,
                    "ebpf_ns_per_drop": c.ns_per_drop.map(Spread::json),
                    "peak_rss_bytes": c.peak_rss,
                    "latency_seconds": c.latency.map(Spread::json),
                    "latency_bursts_never_shown": c.latency_missing,
                    "idle_cpu_cores": c.idle_cpu,
                    "log_tail": c.log_loss.map(|(l, counted, actual)| json!({
                        "counted": counted,
                        "actual": actual,
                        "kernel_log_records_overwritten": l.lost_records,
                        "kmsg_overruns": l.overruns,
                        "callbacks_suppressed": l.suppressed,
                        "unparsed_lines": l.unparsed,
                    })),
                    "scenarios": scenarios,
                })
            })
            .collect();
        let doc = json!({
            "machine": r.machine,
            "threads": r.threads,
            "rounds": r.rounds.len(),
            "window_seconds": r.window.as_secs_f64(),
            "wall_seconds": r.wall.as_secs_f64(),
            "configurations": configurations,
            "overflow": r.overflow.as_ref().map(|o| json!({
                "map_entries": o.map_entries, "flows": o.flows, "actual": o.actual,
                "counted": o.counted, "lost": o.lost, "foreign_netfilter_drops": o.foreign,
                "counted_node": o.counted_all, "kernel_drops_node": o.kernel_all,
            })),
            "connection_rate": crate::connections::json(r),
            "port_scan": r.port_scan.as_ref().map(|p| json!({
                "ports": p.ports, "actual": p.actual, "counted": p.counted,
                "series_total": p.series_total, "series_destination": p.series_dst,
                "metrics_bytes": p.metrics_bytes, "peak_rss_bytes": p.peak_rss,
            })),
            "targets": self.targets.iter().map(|t| json!({
                "name": t.name, "pass": t.pass, "detail": t.detail,
            })).collect::<Vec<_>>(),
        });
        Ok(serde_json::to_string_pretty(&doc)?)
    }
}

fn config_stats(results: &Results, config: Config) -> ConfigStats {
    let sessions = sessions_of(results, config);
    let scenarios: Vec<ScenarioStats> = (0..results.scenarios.len())
        .map(|i| {
            let windows: Vec<&Window> = sessions.iter().filter_map(|s| s.windows.get(i)).collect();
            let ratios: Vec<f64> = results
                .rounds
                .iter()
                .enumerate()
                .filter_map(|(round, sessions)| {
                    let w = sessions
                        .iter()
                        .find(|(c, _)| *c == config)?
                        .1
                        .windows
                        .get(i)?;
                    let l = limit_window(results, round, i)?;
                    Some(w.rate() / l.rate().max(1e-9))
                })
                .collect();
            let counted: Option<u64> = windows.iter().map(|w| w.counted).sum();
            ScenarioStats {
                rate: Spread::of(&windows.iter().map(|w| w.rate()).collect::<Vec<_>>()),
                ratio: Spread::of(&ratios),
                counted,
                actual: windows.iter().map(|w| w.actual).sum(),
                lost: windows.iter().map(|w| w.lost).sum(),
                inexact: windows
                    .iter()
                    .filter(|w| w.counted.is_some() && w.counted != Some(w.actual))
                    .count(),
                cpu_s: windows.iter().map(|w| w.cpu.map(|c| c.as_secs_f64())).sum(),
                ns_per_drop: Spread::of(
                    &sessions
                        .iter()
                        .filter_map(|s| s.ns_per_drop.get(i).copied().flatten())
                        .collect::<Vec<_>>(),
                ),
                paired: Paired::of(
                    &sessions
                        .iter()
                        .map(|s| {
                            (
                                s.paired_ns.get(i).copied().flatten(),
                                s.paired_ns_reversed.get(i).copied().flatten(),
                            )
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        })
        .collect();
    let ratio_to_limit = if config == Config::Limit {
        Some(1.0)
    } else {
        scenarios
            .iter()
            .filter_map(|s| s.ratio.map(|r| r.median))
            .reduce(f64::min)
    };
    let accuracy = match config {
        Config::Limit => None,
        Config::Daemon => {
            let counted: Option<u64> = scenarios.iter().map(|s| s.counted).sum();
            let actual: u64 = scenarios.iter().map(|s| s.actual).sum();
            counted.map(|c| c as f64 / actual.max(1) as f64)
        }
        Config::Bpftrace | Config::LogTail => {
            let (c, a) = sessions
                .iter()
                .filter_map(|s| s.session_count)
                .fold((0, 0), |(c, a), (x, y)| (c + x, a + y));
            (a > 0).then(|| c as f64 / a as f64)
        }
    };
    let cpu: Option<f64> = scenarios.iter().map(|s| s.cpu_s).sum();
    let actual: u64 = scenarios.iter().map(|s| s.actual).sum();
    let log_loss = sessions
        .iter()
        .filter_map(|s| Some((s.log_loss?, s.session_count?)))
        .reduce(|(a, (ac, aa)), (b, (bc, ba))| {
            (
                LogLoss {
                    lost_records: a.lost_records + b.lost_records,
                    overruns: a.overruns + b.overruns,
                    suppressed: a.suppressed + b.suppressed,
                    unparsed: a.unparsed + b.unparsed,
                },
                (ac + bc, aa + ba),
            )
        })
        .map(|(l, (c, a))| (l, c, a));
    ConfigStats {
        config,
        ratio_to_limit,
        accuracy,
        cpu_per_million: cpu.map(|c| c / (actual.max(1) as f64 / 1e6)),
        ns_per_drop: scenarios
            .iter()
            .filter_map(|s| s.ns_per_drop)
            .max_by(|a, b| a.median.total_cmp(&b.median)),
        peak_rss: sessions.iter().filter_map(|s| s.peak_rss).max(),
        latency: Spread::of(
            &sessions
                .iter()
                .flat_map(|s| s.latencies.iter().flatten().map(|l| l.as_secs_f64()))
                .collect::<Vec<_>>(),
        ),
        latency_missing: sessions
            .iter()
            .map(|s| s.latencies.iter().filter(|l| l.is_none()).count())
            .sum(),
        idle_cpu: Spread::of(
            &sessions
                .iter()
                .filter_map(|s| s.idle_cpu)
                .collect::<Vec<_>>(),
        )
        .map(|x| x.median),
        log_loss,
        scenarios,
    }
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.decimals$}"))
}

/// 1234567 → "1.23M".
fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{Overflow, Scenario, Session, Window};
    use super::*;
    use crate::flood::FloodKind;

    #[test]
    fn spread_median_min_max() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[4.0, 1.0]).unwrap().median, 2.5);
        assert!(Spread::of(&[]).is_none());
    }

    fn window(actual: u64, secs: f64, counted: Option<u64>) -> Window {
        Window {
            actual,
            sent: actual,
            elapsed: Duration::from_secs_f64(secs),
            counted,
            lost: counted.map(|_| 0),
            cpu: counted.map(|_| Duration::from_millis(10)),
        }
    }

    fn results(daemon_counted: u64) -> Results {
        let scenario = Scenario {
            name: "udp-few",
            kind: FloodKind::Udp,
            flows: 4,
        };
        let limit = Session {
            windows: vec![window(1_000_000, 1.0, None)],
            ..Session::default()
        };
        let daemon = Session {
            windows: vec![window(950_000, 1.0, Some(daemon_counted))],
            ns_per_drop: vec![Some(80.0)],
            peak_rss: Some(10 << 20),
            session_count: None,
            log_loss: None,
            latencies: vec![
                Some(Duration::from_millis(600)),
                Some(Duration::from_millis(900)),
            ],
            idle_cpu: Some(0.001),
            conn: None,
            paired_ns: Vec::new(),
            paired_ns_reversed: Vec::new(),
        };
        let bpftrace = Session {
            windows: vec![window(900_000, 1.0, None)],
            ns_per_drop: vec![Some(60.0)],
            peak_rss: Some(50 << 20),
            session_count: Some((900_010, 900_000)),
            ..Session::default()
        };
        Results {
            scenarios: vec![scenario],
            configs: vec![Config::Limit, Config::Daemon, Config::Bpftrace],
            rounds: vec![vec![
                (Config::Daemon, daemon),
                (Config::Limit, limit),
                (Config::Bpftrace, bpftrace),
            ]],
            overflow: Some(Overflow {
                map_entries: 1024,
                flows: 8192,
                actual: 100,
                counted: 60,
                lost: 40,
                foreign: 0,
                counted_all: 61,
                kernel_all: 101,
            }),
            ..Results::default()
        }
    }

    #[test]
    fn targets_follow_the_numbers() {
        let r = results(950_000);
        let report = Report::new(&r);
        let pass = |prefix: &str| {
            report
                .targets
                .iter()
                .find(|t| t.name.starts_with(prefix))
                .unwrap_or_else(|| panic!("no target {prefix}"))
                .pass
        };
        assert_eq!(pass("accuracy 1.0, udp-few"), Some(true));
        assert_eq!(pass("ratio to the limit"), Some(true));
        assert_eq!(pass("no worse than bpftrace"), Some(true));
        assert_eq!(pass("beyond the map"), Some(true));
        assert_eq!(pass("drop -> counter"), Some(true));
        // 10 ms for 0.95 M drops.
        assert_eq!(pass("observer CPU"), Some(true));
        let json: Value = serde_json::from_str(&report.json_string().unwrap()).unwrap();
        let daemon = &json["configurations"][1];
        assert_eq!(daemon["name"], "deny-observer");
        assert!((daemon["ratio_to_limit"].as_f64().unwrap() - 0.95).abs() < 1e-9);
        assert_eq!(daemon["accuracy"].as_f64(), Some(1.0));
        assert!(json["configurations"][0]["accuracy"].is_null());
        assert!(report.text().contains("PASS"));

        assert_eq!(
            json["configurations"][1]["latency_seconds"]["max"].as_f64(),
            Some(0.9)
        );

        let off_by_one = results(949_999);
        let report = Report::new(&off_by_one);
        let t = report
            .targets
            .iter()
            .find(|t| t.name.starts_with("accuracy 1.0"))
            .unwrap();
        assert_eq!(t.pass, Some(false));
        assert!(report.text().contains("FAIL"));

        // One packet more counted than the kernel saw (a double count) fails, as does one
        // fewer (a silent loss).
        for counted_all in [62, 60] {
            let mut r = results(950_000);
            if let Some(o) = r.overflow.as_mut() {
                o.counted_all = counted_all;
            }
            let report = Report::new(&r);
            let t = report
                .targets
                .iter()
                .find(|t| t.name.starts_with("beyond the map"))
                .unwrap();
            assert_eq!(t.pass, Some(false), "{}", t.detail);
        }
    }

    /// The eBPF ns/drop target of `r`'s report, and the report's JSON.
    fn ns_target(r: &Results) -> (Target, Value) {
        let report = Report::new(r);
        let t = report
            .targets
            .iter()
            .find(|t| t.name.starts_with("eBPF ns/drop"))
            .unwrap()
            .clone();
        let json: Value = serde_json::from_str(&report.json_string().unwrap()).unwrap();
        (t, json)
    }

    /// The eBPF cost is compared scenario by scenario: a cheap few-flow scenario must not hide
    /// behind the peer's costliest one, nor the reverse.
    #[test]
    fn ns_per_drop_target_compares_the_same_scenario() {
        let with_costs = |daemon: [f64; 2], bpftrace: [f64; 2]| {
            let mut r = results(950_000);
            r.scenarios.push(Scenario {
                name: "udp-many",
                kind: FloodKind::Udp,
                flows: 4096,
            });
            for (c, s) in &mut r.rounds[0] {
                let w = s.windows[0].clone();
                s.windows.push(w);
                s.ns_per_drop = match c {
                    Config::Daemon => daemon.iter().map(|&x| Some(x)).collect(),
                    Config::Bpftrace => bpftrace.iter().map(|&x| Some(x)).collect(),
                    _ => Vec::new(),
                };
            }
            ns_target(&r)
        };
        // Costliest against costliest would pass (200 <= 250); udp-few does not.
        let (t, json) = with_costs([150.0, 200.0], [100.0, 250.0]);
        assert_eq!(t.pass, Some(false), "{}", t.detail);
        assert!(
            t.detail.contains("udp-few 150.0 (150.0-150.0) vs 100.0"),
            "{}",
            t.detail
        );
        let daemon = &json["configurations"][1];
        assert_eq!(daemon["ebpf_ns_per_drop"]["median"].as_f64(), Some(200.0));
        assert_eq!(
            daemon["scenarios"]["udp-few"]["ebpf_ns_per_drop"]["median"].as_f64(),
            Some(150.0)
        );
        assert_eq!(with_costs([90.0, 250.0], [100.0, 250.0]).0.pass, Some(true));
        assert_eq!(
            with_costs([90.0, 251.0], [100.0, 250.0]).0.pass,
            Some(false)
        );
        // A scenario the peer was not measured in cannot pass.
        let (t, _) = with_costs([90.0, 200.0], [f64::NAN, 250.0]);
        assert_eq!(t.pass, None, "{}", t.detail);
    }

    /// With figures from both programs attached together in every scenario, those decide (per
    /// round ratio, median), whatever the separate sessions said; missing in one scenario,
    /// the separate sessions decide.
    #[test]
    fn paired_ns_per_drop_decides_when_every_scenario_has_it() {
        let with_pairs = |rounds: &[Option<(f64, f64)>]| {
            let mut r = results(950_000);
            let proto = r.rounds[0].clone();
            r.rounds.clear();
            for pair in rounds {
                let mut round = proto.clone();
                for (c, s) in &mut round {
                    if *c == Config::Daemon {
                        s.paired_ns = vec![*pair];
                    }
                }
                r.rounds.push(round);
            }
            ns_target(&r)
        };
        // Separately, 80 vs 60 fails; paired, two rounds of three are cheaper.
        let (t, json) = with_pairs(&[
            Some((100.0, 110.0)),
            Some((130.0, 120.0)),
            Some((90.0, 100.0)),
        ]);
        assert_eq!(t.pass, Some(true), "{}", t.detail);
        assert!(
            t.detail
                .contains("udp-few 100.0 (90.0-130.0) vs 110.0 (100.0-120.0), ratio 0.909"),
            "{}",
            t.detail
        );
        let p = &json["configurations"][1]["scenarios"]["udp-few"]["ebpf_ns_per_drop_paired"];
        assert_eq!(p["bpftrace"]["median"].as_f64(), Some(110.0));
        let (t, _) = with_pairs(&[Some((100.0, 90.0)), Some((100.0, 99.0))]);
        assert_eq!(t.pass, Some(false), "{}", t.detail);
        // No pair at all: the separate sessions' 80 vs 60 decide.
        let (t, _) = with_pairs(&[None, None]);
        assert_eq!(t.pass, Some(false), "{}", t.detail);
        assert!(!t.detail.contains("same floods"), "{}", t.detail);
    }

    /// A round measured in both attach orders is judged by the geometric mean of the two, so
    /// that neither program gets the second place's warm caches every time.
    #[test]
    fn paired_ns_per_drop_averages_both_attach_orders() {
        let with_orders = |rounds: &[RoundPairs]| {
            let mut r = results(950_000);
            let proto = r.rounds[0].clone();
            r.rounds.clear();
            for &(first, second) in rounds {
                let mut round = proto.clone();
                for (c, s) in &mut round {
                    if *c == Config::Daemon {
                        s.paired_ns = vec![first];
                        s.paired_ns_reversed = vec![second];
                    }
                }
                r.rounds.push(round);
            }
            ns_target(&r)
        };
        // Daemon first 1.2 alone would fail; with the one-liner first 0.75: sqrt(0.9) < 1.
        let (t, json) = with_orders(&[(Some((120.0, 100.0)), Some((75.0, 100.0)))]);
        assert_eq!(t.pass, Some(true), "{}", t.detail);
        let p = &json["configurations"][1]["scenarios"]["udp-few"]["ebpf_ns_per_drop_paired"];
        let mean = p["deny_observer"]["median"].as_f64().unwrap();
        assert!((mean - (120.0f64 * 75.0).sqrt()).abs() < 1e-9, "{p}");
        assert_eq!(p["ratio_daemon_first"]["median"].as_f64(), Some(1.2));
        assert_eq!(p["ratio_one_liner_first"]["median"].as_f64(), Some(0.75));
        assert!(t.detail.contains("daemon first 1.200"), "{}", t.detail);
        // Both orders over 1: fails however they are averaged.
        let (t, _) = with_orders(&[(Some((120.0, 100.0)), Some((105.0, 100.0)))]);
        assert_eq!(t.pass, Some(false), "{}", t.detail);
        // A round without the reversed window is judged by the order it has.
        let (t, json) = with_orders(&[(Some((120.0, 100.0)), None)]);
        assert_eq!(t.pass, Some(false), "{}", t.detail);
        let p = &json["configurations"][1]["scenarios"]["udp-few"]["ebpf_ns_per_drop_paired"];
        assert!(p["ratio_one_liner_first"].is_null(), "{p}");
    }

    #[test]
    fn log_tail_reports_its_loss_and_has_no_targets() {
        let mut r = results(950_000);
        let tail = |counted, lost| Session {
            windows: vec![window(400_000, 1.0, None)],
            peak_rss: Some(3 << 20),
            session_count: Some((counted, 400_000)),
            log_loss: Some(LogLoss {
                lost_records: lost,
                overruns: 2,
                suppressed: 0,
                unparsed: 0,
            }),
            ..Session::default()
        };
        r.configs.push(Config::LogTail);
        r.rounds[0].push((Config::LogTail, tail(100_000, 299_000)));
        let limit = r.rounds[0][1].1.clone();
        r.rounds.push(vec![
            (Config::Limit, limit),
            (Config::LogTail, tail(60_000, 339_000)),
        ]);
        let report = Report::new(&r);
        let json: Value = serde_json::from_str(&report.json_string().unwrap()).unwrap();
        let lt = json["configurations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "log-tail")
            .unwrap();
        assert_eq!(lt["accuracy"].as_f64(), Some(160_000.0 / 800_000.0));
        assert!((lt["ratio_to_limit"].as_f64().unwrap() - 0.4).abs() < 1e-9);
        assert!(lt["ebpf_ns_per_drop"].is_null());
        assert_eq!(lt["log_tail"]["kernel_log_records_overwritten"], 638_000);
        assert_eq!(lt["log_tail"]["kmsg_overruns"], 4);
        assert_eq!(lt["log_tail"]["counted"], 160_000);
        assert!(json["configurations"][1]["log_tail"].is_null());
        assert!(!report.targets.iter().any(|t| t.name.contains("log-tail")));
        let text = report.text();
        assert!(
            text.contains("log-tail: counted 160000 of 800000 drops (0.2000)"),
            "{text}"
        );
        assert!(text.contains("not accounted for: 2000"), "{text}");
        assert!(!text.contains("not implemented"));
        assert!(
            text.contains("`log prefix \"deny-observer-bench: \"`"),
            "{text}"
        );
    }
}
