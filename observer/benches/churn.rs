//! Pod churn in a 10,000-pod / 2,000-policy inventory: what one pod change costs the drain
//! path's views, applied in place ([`Views::update`]) against the full rebuild every change
//! used to cost (engine, attribution index, and an emptied verdict cache), timed interleaved in
//! the same run and reported as a ratio.
//!
//! Run: `cargo bench -p observer --bench churn`. Both sides get the same snapshots; building a
//! snapshot is the source's work and is not timed. The rebuild side also re-judges the flows
//! the cache held, which is what the next drain pays after a cache was emptied.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark binary: panicking with context is the right failure"
)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use observer::flow::Protocol;
use observer::inventory::{
    Endpoint, Inventory, Labels, Namespace, NodeAddrs, Pod, PodPhase, Workload,
};
use observer::verdict::{FlowQuery, Peer, Update, VerdictCache, Views};
use serde_json::json;

const NAMESPACES: usize = 100;
const PODS_PER_NS: usize = 100;
const POLICIES_PER_NS: usize = 20;
const APPS: usize = 25;
/// Distinct flows the verdict cache holds when a pod changes.
const FLOWS: usize = 20_000;
const ROUNDS: usize = 60;
/// The incremental update must be at least this many times cheaper than a rebuild.
const TARGET_RATIO: f64 = 10.0;

fn ip(idx: usize) -> IpAddr {
    format!("10.{}.{}.{}", idx / 65536, (idx / 256) % 256, idx % 256)
        .parse()
        .unwrap()
}

fn pod(n: usize, p: usize, generation: u64) -> Arc<Pod> {
    let app = format!("app{}", p % APPS);
    Arc::new(Pod {
        namespace: format!("ns{n:03}"),
        name: format!("{app}-{p:03}"),
        labels: Labels::from([
            ("app".to_owned(), app.clone()),
            ("tier".to_owned(), format!("tier{}", p % 3)),
        ]),
        ips: vec![ip(n * PODS_PER_NS + p)],
        host_network: false,
        node_name: Some(format!("node-{}", p % 50)),
        phase: PodPhase::Running,
        // A change: the pod was replaced (same name, as a StatefulSet does), newer.
        uid: None,
        created_unix: generation as i64,
        ports: vec![],
        workload: Workload {
            kind: "Deployment".into(),
            name: app,
        },
    })
}

fn inventory() -> Inventory {
    let mut namespaces = BTreeMap::new();
    let mut pods = Vec::new();
    let mut policies = Vec::new();
    for n in 0..NAMESPACES {
        let ns = format!("ns{n:03}");
        namespaces.insert(
            ns.clone(),
            Namespace {
                name: ns.clone(),
                labels: Labels::from([
                    ("kubernetes.io/metadata.name".to_owned(), ns.clone()),
                    ("team".to_owned(), format!("t{}", n % 10)),
                ]),
            },
        );
        for p in 0..PODS_PER_NS {
            pods.push(pod(n, p, 0));
        }
        for k in 0..POLICIES_PER_NS {
            let np: NetworkPolicy = serde_json::from_value(json!({
                "metadata": {"name": format!("p{k}"), "namespace": ns},
                "spec": {
                    "podSelector": {"matchLabels": {"app": format!("app{}", k % APPS)}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [
                        {"podSelector": {"matchLabels": {"app": format!("app{}", (k + 1) % APPS)}}},
                        {"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 10)}}}
                    ], "ports": [{"protocol": "TCP", "port": 8080}]}]
                }
            }))
            .unwrap();
            policies.push(Arc::new(np));
        }
    }
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Inventory {
        namespaces,
        pods,
        policies,
        services: vec![],
        invalid: vec![],
    }
}

fn peer(views: &Views, ip: IpAddr) -> Peer {
    match views.attributor.lookup(ip) {
        Endpoint::Pod(p) => Peer::Pod(p),
        _ => Peer::External(ip),
    }
}

/// Judges `flows` through the cache, as a drain does.
fn judge(views: &Views, cache: &VerdictCache, flows: &[(IpAddr, IpAddr)]) {
    for &(src, dst) in flows {
        let q = FlowQuery {
            src: peer(views, src),
            dst: peer(views, dst),
            protocol: Protocol::Tcp,
            port: 8080,
            family: None,
            own_node: false,
            src_remote: false,
        };
        black_box(cache.get_or_evaluate(&views.engine, &q));
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let base = Arc::new(inventory());
    let pods = base.pods.len();
    let flows: Vec<(IpAddr, IpAddr)> = (0..FLOWS)
        .map(|i| (ip((i * 7919) % pods), ip((i * 104_729 + 13) % pods)))
        .collect();
    let node = NodeAddrs::new([]);
    let mut inc = Views::new(Arc::clone(&base), node.clone());
    let inc_cache = VerdictCache::new(65_536);
    judge(&inc, &inc_cache, &flows);
    let mut full = Views::new(Arc::clone(&base), node.clone());
    let full_cache = VerdictCache::new(65_536);
    judge(&full, &full_cache, &flows);

    let (mut t_inc, mut t_full, mut t_full_rejudge) = (Vec::new(), Vec::new(), Vec::new());
    let mut invalidated = 0;
    let mut current = base;
    for round in 0..ROUNDS {
        // One pod replaced: a new snapshot sharing every other pod, as the API-server source
        // publishes it.
        let (n, p) = ((round * 37) % NAMESPACES, (round * 11) % PODS_PER_NS);
        let changed = pod(n, p, round as u64 + 1);
        let at = current
            .pods
            .iter()
            .position(|x| x.namespace == changed.namespace && x.name == changed.name)
            .expect("the pod is in the inventory");
        let mut next = (*current).clone();
        next.pods[at] = changed;
        let next = Arc::new(next);

        let started = Instant::now();
        let update = inc.update(Arc::clone(&next), &inc_cache);
        t_inc.push(started.elapsed());
        match update {
            Update::Pods {
                removed: 1,
                added: 1,
                invalidated: k,
            } => invalidated += k,
            other => panic!("expected one changed pod, got {other:?}"),
        }

        let started = Instant::now();
        full = Views::new(Arc::clone(&next), node.clone());
        full_cache.clear();
        t_full.push(started.elapsed());
        judge(&full, &full_cache, &flows);
        t_full_rejudge.push(started.elapsed());
        // The incremental side's next drain: only invalidated flows are judged again.
        judge(&inc, &inc_cache, &flows);
        current = next;
    }
    black_box(&full);
    let (inc_m, full_m, rejudge_m) = (median(t_inc), median(t_full), median(t_full_rejudge));
    let ratio = full_m.as_secs_f64() / inc_m.as_secs_f64().max(1e-9);
    let ratio_rejudge = rejudge_m.as_secs_f64() / inc_m.as_secs_f64().max(1e-9);
    println!(
        "churn: {pods} pods, {} policies, {FLOWS} cached flows, {ROUNDS} pod changes (medians)",
        current.policies.len()
    );
    println!(
        "churn:   in place (Views::update)           {:>10.1} µs per change; {:.1} cached verdicts dropped per change",
        inc_m.as_secs_f64() * 1e6,
        invalidated as f64 / ROUNDS as f64
    );
    println!(
        "churn:   rebuild (engine + index + cache)   {:>10.1} µs per change  ({ratio:.0}× the in-place cost)",
        full_m.as_secs_f64() * 1e6
    );
    println!(
        "churn:   rebuild + re-judging cached flows  {:>10.1} µs per change  ({ratio_rejudge:.0}×)",
        rejudge_m.as_secs_f64() * 1e6
    );
    let ok = ratio >= TARGET_RATIO;
    println!(
        "churn: in place ≥ {TARGET_RATIO:.0}× cheaper than a rebuild: {}",
        if ok { "PASS" } else { "FAIL" }
    );
    if !ok {
        std::process::exit(1);
    }
}
