//! `cargo xtask bench-map`: how long the traffic map takes to render in headless Chromium.
//!
//! A synthetic cluster (workloads spread over namespaces, some with a default deny and allow
//! rules, some open fields) and its edges (allowed with ports, denied without, as the metrics
//! give them) are written to a temporary directory; `deny-observer map --edges --output` makes
//! the page; Chromium loads it over the DevTools protocol. The page records, when its graph
//! has been laid out and two animation frames painted, the milliseconds since navigation
//! start (`data-render-ms`, the figure the target is for), and when its accessible list,
//! built after that frame, is complete (`data-list-ms`, reported alongside). The baseline, measured in the same run and interleaved with the
//! map loads, is a trivial page that records the same thing: the ratio is what the map costs
//! over the browser's own page load on this machine.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testkit::chromium::Browser;

/// Arguments of `cargo xtask bench-map`.
#[derive(Debug, Clone, clap::Args)]
pub struct MapBenchArgs {
    /// Workloads of the full-detail scenario (the target: 2,000).
    #[arg(long, default_value_t = 2000)]
    pub workloads: usize,
    /// Edges of the full-detail scenario (the target: 10,000).
    #[arg(long, default_value_t = 10_000)]
    pub edges: usize,
    /// Loads of each page (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Target render time of the full-detail scenario, milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub target_ms: u64,
    /// The deny-observer binary (default: build target/release/deny-observer).
    #[arg(long)]
    pub daemon: Option<std::path::PathBuf>,
    /// Keep the generated clusters and pages in this directory (default: a temporary one).
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
    /// Only time these existing pages (no generation, no targets): for work on the page's
    /// script without rebuilding the binary.
    #[arg(long)]
    pub page: Vec<std::path::PathBuf>,
}

/// A deterministic generator, so every run draws the same cluster.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Writes `inventory/cluster.json` and `edges.jsonl` for `workloads` and `edges` into `dir`.
pub fn write_cluster(dir: &Path, workloads: usize, edges: usize) -> anyhow::Result<()> {
    let per_ns = 50usize;
    let namespaces = workloads.div_ceil(per_ns).max(1);
    let mut items = Vec::new();
    for n in 0..namespaces {
        let ns = format!("team-{n:03}");
        items.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        // Two namespaces in three have a default deny and one allow rule; the rest are open.
        if n % 3 != 2 {
            items.push(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "default-deny", "namespace": ns},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
            }));
            items.push(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "allow-same-namespace", "namespace": ns},
                "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}],
                          "ports": [{"protocol": "TCP", "port": 8080}]}]},
            }));
        }
    }
    for w in 0..workloads {
        let ns = format!("team-{:03}", w / per_ns);
        let name = format!("svc-{w:04}");
        let hash = format!("{:x}", 0x5d4f_8c7b9u64 + w as u64);
        let ip = format!("10.{}.{}.{}", 64 + (w >> 16), (w >> 8) & 0xff, w & 0xff);
        items.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("{name}-{hash}-abcde"), "namespace": ns,
                "labels": {"app": name, "pod-template-hash": hash},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": format!("{name}-{hash}"), "uid": format!("uid-{w}"), "controller": true}],
            },
            "spec": {"nodeName": "bench-node", "containers": [{"name": "c", "image": "x",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }));
    }
    let inv = dir.join("inventory");
    std::fs::create_dir_all(&inv)?;
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(inv.join("cluster.json"), serde_json::to_vec(&list)?)?;

    let mut rng = Lcg(42);
    let mut seen = std::collections::BTreeSet::new();
    let mut out = String::new();
    let mut attempts = 0usize;
    while seen.len() < edges {
        attempts += 1;
        if attempts > edges.saturating_mul(50) {
            bail!("cannot draw {edges} distinct edges between {workloads} workloads");
        }
        let src = rng.below(workloads);
        // Most traffic stays near: the same or a neighbouring namespace.
        let dst = if rng.below(4) == 0 {
            rng.below(workloads)
        } else {
            ((src / per_ns) * per_ns + rng.below(per_ns * 2)).min(workloads - 1)
        };
        let denied = rng.below(5) == 0;
        let port = if denied {
            None
        } else {
            Some([8080, 443, 5432, 6379][rng.below(4)])
        };
        if src == dst || !seen.insert((src, dst, denied, port)) {
            continue;
        }
        let edge = json!({
            "source_namespace": format!("team-{:03}", src / per_ns),
            "source_workload": format!("svc-{src:04}"),
            "destination_namespace": format!("team-{:03}", dst / per_ns),
            "destination_workload": format!("svc-{dst:04}"),
            "protocol": "tcp", "port": port,
            "observed": 1 + rng.below(5000), "verdict": if denied { "deny" } else { "allow" },
        });
        writeln!(out, "{edge}")?;
    }
    std::fs::write(dir.join("edges.jsonl"), out)?;
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// One page load: milliseconds from navigation start to the graph's first painted frame
/// (`data-render-ms`), and what the map drew (with `list_ms`, when its accessible list was
/// complete).
fn load(browser: &mut Browser, url: &str) -> anyhow::Result<(f64, Value)> {
    browser.navigate(url)?;
    browser.wait_for(
        "document.body && document.body.dataset.ready === 'true'",
        Duration::from_secs(120),
    )?;
    let ms = browser
        .eval("Number(document.body.dataset.renderMs)")?
        .as_f64()
        .context("no data-render-ms")?;
    let drawn = browser.eval(
        "window.trafficMap ? Object.assign(window.trafficMap.drawn(), {phases: window.trafficMap.phases(), list_ms: Number(document.body.dataset.listMs)}) : null",
    )?;
    Ok((ms, drawn))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark with `bin` making the pages.
pub fn run(args: &MapBenchArgs, bin: &Path) -> anyhow::Result<()> {
    if args.rounds == 0 || args.workloads < 2 || args.edges == 0 {
        bail!("--rounds, --workloads (>= 2) and --edges must be positive");
    }
    let temp = tempfile::tempdir()?;
    let work = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => temp.path().to_owned(),
    };
    let baseline = work.join("baseline.html");
    std::fs::write(
        &baseline,
        "<!DOCTYPE html><html><body><p>baseline</p><script>requestAnimationFrame(() => requestAnimationFrame(() => { document.body.setAttribute('data-render-ms', String(Math.round(performance.now()))); document.body.setAttribute('data-ready', 'true'); }));</script></body></html>",
    )?;
    // Full detail at the target size, and twice that: beyond the limits the page starts at
    // the namespace level.
    let scenarios = [
        ("full", args.workloads, args.edges),
        ("aggregated", args.workloads * 2, args.edges * 2),
    ];
    let mut pages = Vec::new();
    if !args.page.is_empty() {
        let mut browser = Browser::launch(1400, 900)?;
        for page in &args.page {
            for _ in 0..args.rounds {
                let (ms, d) = load(&mut browser, &format!("file://{}", page.display()))?;
                println!("{}: {ms:.0} ms {d}", page.display());
            }
        }
        return Ok(());
    }
    for (name, workloads, edges) in scenarios {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        write_cluster(&dir, workloads, edges)?;
        let page = dir.join("map.html");
        let started = Instant::now();
        let out = std::process::Command::new(bin)
            .args(["map", "--inventory"])
            .arg(dir.join("inventory"))
            .arg("--edges")
            .arg(dir.join("edges.jsonl"))
            .arg("--output")
            .arg(&page)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!("map failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let made = started.elapsed();
        let bytes = std::fs::metadata(&page)?.len();
        pages.push((name, workloads, edges, page, made, bytes));
    }
    let mut browser = Browser::launch(1400, 900)?;
    let base_url = format!("file://{}", baseline.display());
    let mut base_ms = Vec::new();
    let mut map_ms: Vec<Vec<f64>> = vec![Vec::new(); pages.len()];
    let mut list_ms: Vec<Vec<f64>> = vec![Vec::new(); pages.len()];
    let mut drawn: Vec<Value> = vec![Value::Null; pages.len()];
    // Warm-up: the first load of a browser pays for its own start.
    load(&mut browser, &base_url)?;
    for round in 0..args.rounds {
        base_ms.push(load(&mut browser, &base_url)?.0);
        for (i, (_, _, _, page, _, _)) in pages.iter().enumerate() {
            let (ms, d) = load(&mut browser, &format!("file://{}", page.display()))?;
            eprintln!(
                "bench-map: round {}: {} {ms:.0} ms (ms since navigation start: {})",
                round + 1,
                pages[i].0,
                d["phases"]
            );
            map_ms[i].push(ms);
            if let Some(list) = d["list_ms"].as_f64() {
                list_ms[i].push(list);
            }
            drawn[i] = d;
        }
    }
    let base = median(&mut base_ms);
    println!(
        "cpu: {} ({} cores)",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<11} {:>9} {:>7} {:>10} {:>9} {:>12} {:>13} {:>7} {:>10}  drawn",
        "scenario",
        "workloads",
        "edges",
        "page",
        "map cmd",
        "render med",
        "(min-max)",
        "ratio",
        "list med"
    );
    println!(
        "{:<11} {:>9} {:>7} {:>10} {:>9} {:>10.0}ms {:>13} {:>7.2} {:>10}  -",
        "baseline", "-", "-", "-", "-", base, "", 1.0, "-"
    );
    let mut pass = true;
    for (i, (name, workloads, edges, _, made, bytes)) in pages.iter().enumerate() {
        let min = map_ms[i].iter().copied().fold(f64::MAX, f64::min);
        let max = map_ms[i].iter().copied().fold(0.0, f64::max);
        let med = median(&mut map_ms[i]);
        let list = if list_ms[i].is_empty() {
            "-".to_owned()
        } else {
            format!("{:.0}ms", median(&mut list_ms[i]))
        };
        let d = &drawn[i];
        println!(
            "{:<11} {:>9} {:>7} {:>8.1}MB {:>8.1}s {:>10.0}ms {:>13} {:>7.2} {:>10}  {} workloads, {} namespaces, {} edges{}",
            name,
            workloads,
            edges,
            *bytes as f64 / 1e6,
            made.as_secs_f64(),
            med,
            format!("({min:.0}-{max:.0})"),
            med / base.max(1.0),
            list,
            d["workloads"],
            d["namespaces"],
            d["edges"],
            if d["aggregated"] == json!(true) {
                " (by namespace)"
            } else {
                ""
            }
        );
        if *name == "full" {
            let ok = med <= args.target_ms as f64 && d["aggregated"] == json!(false);
            pass &= ok;
            println!(
                "{} {} workloads and {} edges drawn in full within {} ms (median {:.0} ms)",
                if ok { "PASS" } else { "FAIL" },
                workloads,
                edges,
                args.target_ms,
                med
            );
        } else {
            let ok = d["aggregated"] == json!(true) && med <= args.target_ms as f64;
            pass &= ok;
            println!(
                "{} beyond the limits the map starts by namespace and renders within {} ms (median {:.0} ms)",
                if ok { "PASS" } else { "FAIL" },
                args.target_ms,
                med
            );
        }
    }
    if !pass {
        bail!("a map render target failed");
    }
    Ok(())
}
