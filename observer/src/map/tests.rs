use super::*;

const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
- {apiVersion: v1, kind: Namespace, metadata: {name: dev}}
- apiVersion: v1
  kind: Pod
  metadata: {name: web-7d4f8c7b9-abcde, namespace: shop, labels: {app: web, pod-template-hash: 7d4f8c7b9}, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4f8c7b9, uid: u1, controller: true}]}
  spec: {containers: [{name: c, image: x, ports: [{name: http, containerPort: 80}]}]}
  status: {phase: Running, podIP: 10.0.0.1}
- apiVersion: v1
  kind: Pod
  metadata: {name: api-6c9f8b7d4-k2x9z, namespace: shop, labels: {app: api, pod-template-hash: 6c9f8b7d4}, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: api-6c9f8b7d4, uid: u2, controller: true}]}
  spec: {containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9000}]}]}
  status: {phase: Running, podIP: 10.0.0.2}
- apiVersion: v1
  kind: Pod
  metadata: {name: tool, namespace: dev, labels: {app: tool}}
  spec: {containers: [{name: c, image: x}]}
  status: {phase: Running, podIP: 10.0.0.4}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: default-deny, namespace: shop}
  spec: {podSelector: {}, policyTypes: [Ingress]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: allow-web-to-api, namespace: shop}
  spec:
    podSelector: {matchLabels: {app: api}}
    ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 8080}]}]
"#;

fn engine() -> Engine {
    let inv = crate::inventory::manifest::load_str("cluster.yaml".as_ref(), CLUSTER)
        .unwrap_or_else(|e| panic!("{e}"));
    Engine::new(Arc::new(inv))
}

fn obs(
    src: &str,
    dst: &str,
    port: Option<u16>,
    verdict: Observed,
    counts: Vec<u64>,
) -> Observation {
    let (sn, sw) = src.split_once('/').unwrap_or(("", src));
    let (dn, dw) = dst.split_once('/').unwrap_or(("", dst));
    Observation {
        source_namespace: sn.into(),
        source_workload: sw.into(),
        destination_namespace: dn.into(),
        destination_workload: dw.into(),
        protocol: "tcp".into(),
        port,
        verdict,
        policy: None,
        matched: None,
        counts,
        count_ports: Vec::new(),
    }
}

fn observations(edges: Vec<Observation>) -> Observations {
    Observations {
        source: "test".into(),
        windows: vec![("5m".into(), 300.0), ("1h".into(), 3600.0)],
        edges,
        notes: vec![],
        left_out: 0,
    }
}

#[test]
fn edges_are_judged_explained_and_namespaces_marked() {
    let engine = engine();
    let data = build(
        &engine,
        &observations(vec![
            obs(
                "shop/web",
                "shop/api",
                Some(8080),
                Observed::Allow,
                vec![3, 40],
            ),
            obs("dev/tool", "shop/api", None, Observed::Deny, vec![0, 7]),
            obs(
                "shop/web",
                "shop/api",
                Some(9000),
                Observed::Deny,
                vec![1, 1],
            ),
            obs("world", "shop/web", Some(80), Observed::Allow, vec![5, 5]),
            obs(
                "shop/gone",
                "shop/api",
                Some(8080),
                Observed::Allow,
                vec![1, 1],
            ),
        ]),
        7,
    );
    let ids: Vec<&str> = data.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(
        ids,
        ["/world", "dev/tool", "shop/api", "shop/gone", "shop/web"]
    );
    let api = &data.nodes[2];
    assert_eq!((api.kind.as_deref(), api.pods), (Some("Deployment"), 1));
    let ns: Vec<(&str, bool, bool)> = data
        .namespaces
        .iter()
        .map(|n| (n.name.as_str(), n.open, n.known))
        .collect();
    assert_eq!(
        ns,
        [
            ("", false, false),
            ("dev", true, true),
            ("shop", false, true)
        ]
    );

    let find = |src: &str, port: Option<u16>, verdict: &str| {
        data.edges
            .iter()
            .find(|e| e.source == src && e.port == port && e.verdict == verdict)
            .unwrap_or_else(|| panic!("no {src} {port:?} {verdict} in {:#?}", data.edges))
    };
    let allowed = find("shop/web", Some(8080), "allowed");
    assert_eq!(allowed.policy, "shop/allow-web-to-api");
    assert_eq!(allowed.judged, "allow");
    assert_eq!(allowed.observed, [3, 40]);
    assert!(
        allowed.explain.starts_with("verdict: ALLOW"),
        "{}",
        allowed.explain
    );

    // No port from the drop metrics: judged on every declared port, and denied on both.
    let denied = find("dev/tool", None, "denied");
    assert_eq!(denied.policy, "shop/allow-web-to-api,shop/default-deny");
    assert_eq!(denied.matched.as_deref(), Some("default_deny"));
    assert_eq!(denied.judged, "deny");
    assert!(
        denied.explain.contains("TCP/8080") && denied.explain.contains("TCP/9000"),
        "{}",
        denied.explain
    );
    assert!(
        denied.explain.contains("nearest misses"),
        "{}",
        denied.explain
    );

    // Seen denied, and the policies deny it: default_deny; outside peers are judged too.
    let admin = find("shop/web", Some(9000), "denied");
    assert_eq!(admin.matched.as_deref(), Some("default_deny"));
    let world = find("/world", Some(80), "allowed");
    assert_eq!(
        world.judged, "deny",
        "no rule allows the outside into shop/web"
    );

    let gone = find("shop/gone", Some(8080), "allowed");
    assert_eq!(gone.judged, "unknown");
    assert!(gone.explain.contains("cannot judge"), "{}", gone.explain);
    assert!(
        data.notes
            .iter()
            .any(|n| n.contains("not in the inventory")),
        "{:?}",
        data.notes
    );
    assert_eq!(data.windows, ["5m", "1h"]);
}

#[test]
fn a_deny_the_policies_allow_is_unexplained_and_labels_from_prometheus_win() {
    let engine = engine();
    let mut from_prom = obs("dev/tool", "shop/api", None, Observed::Deny, vec![2]);
    from_prom.policy = Some("shop/x".into());
    from_prom.matched = Some("default_deny".into());
    let data = build(
        &engine,
        &observations(vec![
            obs("shop/web", "shop/api", Some(8080), Observed::Deny, vec![4]),
            from_prom,
        ]),
        0,
    );
    let web = data.edges.iter().find(|e| e.source == "shop/web").unwrap();
    assert_eq!(web.matched.as_deref(), Some("unexplained"));
    assert_eq!(web.judged, "allow");
    let tool = data.edges.iter().find(|e| e.source == "dev/tool").unwrap();
    assert_eq!(
        (tool.policy.as_str(), tool.matched.as_deref()),
        ("shop/x", Some("default_deny"))
    );
}

#[test]
fn prometheus_samples_keep_policy_match_and_merge_across_windows() {
    let short = br#"{"status":"success","data":{"resultType":"vector","result":[
        {"metric":{"source_namespace":"dev","source_workload":"tool","destination_namespace":"shop","destination_workload":"api","protocol":"tcp","policy":"shop/default-deny","match":"default_deny"},"value":[1,"2.2"]}]}}"#;
    let long = br#"{"status":"success","data":{"resultType":"vector","result":[
        {"metric":{"source_namespace":"dev","source_workload":"tool","destination_namespace":"shop","destination_workload":"api","protocol":"tcp","policy":"shop/default-deny","match":"default_deny"},"value":[1,"30"]},
        {"metric":{"source_namespace":"","source_workload":"world","destination_namespace":"shop","destination_workload":"web","protocol":"TCP","policy":"shop/default-deny","match":"unexplained"},"value":[1,"1"]}]}}"#;
    let mut all = parse_samples(short, Observed::Deny, 0, 2).unwrap_or_default();
    all.extend(parse_samples(long, Observed::Deny, 1, 2).unwrap_or_default());
    let merged = merge(all, 2);
    assert_eq!(merged.len(), 2, "{merged:#?}");
    let tool = merged.iter().find(|o| o.source_workload == "tool").unwrap();
    assert_eq!(tool.counts, [3, 30]);
    assert_eq!(tool.policy.as_deref(), Some("shop/default-deny"));
    let world = merged
        .iter()
        .find(|o| o.source_workload == "world")
        .unwrap();
    assert_eq!(
        (world.counts.as_slice(), world.protocol.as_str()),
        (&[0, 1][..], "tcp")
    );
    assert_eq!(world.matched.as_deref(), Some("unexplained"));

    assert!(
        parse_samples(
            b"{\"status\":\"error\",\"error\":\"bad\"}",
            Observed::Deny,
            0,
            1
        )
        .is_err()
    );
    let no_workload = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"protocol":"tcp"},"value":[1,"1"]}]}}"#;
    assert!(parse_samples(no_workload, Observed::Allow, 0, 1).is_err());
}

#[test]
fn windows_are_the_standard_shorter_ones_then_the_given_one() {
    let names = |w: &str| -> Vec<String> {
        filter_windows(w)
            .unwrap_or_default()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    assert_eq!(names("1h"), ["5m", "1h"]);
    assert_eq!(names("7d"), ["5m", "1h", "6h", "1d", "7d"]);
    assert_eq!(names("2m"), ["2m"]);
    assert_eq!(window_seconds("1d12h").ok(), Some(129_600.0));
    assert!(window_seconds("7x").is_err());
    assert!(denied_query("1h").contains("policy, match"));
    assert!(allowed_query("1h").contains(", port)"));
}

#[test]
fn the_page_embeds_everything_it_needs() {
    let data = build(
        &engine(),
        &observations(vec![obs(
            "dev/tool",
            "shop/api",
            None,
            Observed::Deny,
            vec![1, 2],
        )]),
        0,
    );
    let html = page::render(&data);
    assert!(html.contains("id=\"map-data\""));
    assert!(
        html.contains("The Cytoscape Consortium"),
        "the licence header stays in"
    );
    assert!(
        !html.contains("<script src") && !html.contains("<link"),
        "nothing loads from elsewhere"
    );
    assert!(html.contains("\"source\":\"dev/tool\""));
}

#[test]
fn denied_edges_take_their_ports_from_the_new_edge_series() {
    // tool -> api was denied on 8080 and 9000, and on more ports than the daemon names
    // (`other`); world -> web has a series only on port 0 (a header cut short); dev/tool ->
    // shop/web has none (learned): it keeps no port.
    let ports = br#"{"status":"success","data":{"resultType":"vector","result":[
        {"metric":{"source_namespace":"dev","source_workload":"tool","destination_namespace":"shop","destination_workload":"api","protocol":"tcp","port":"9000"},"value":[1,"1"]},
        {"metric":{"source_namespace":"dev","source_workload":"tool","destination_namespace":"shop","destination_workload":"api","protocol":"tcp","port":"8080"},"value":[1,"1"]},
        {"metric":{"source_namespace":"dev","source_workload":"tool","destination_namespace":"shop","destination_workload":"api","protocol":"tcp","port":"other"},"value":[1,"1"]},
        {"metric":{"source_namespace":"dev","source_workload":"tool","destination_namespace":"shop","destination_workload":"api","protocol":"udp","port":"53"},"value":[1,"1"]},
        {"metric":{"source_namespace":"","source_workload":"world","destination_namespace":"shop","destination_workload":"web","protocol":"tcp","port":"0"},"value":[1,"1"]},
        {"metric":{"source_namespace":"dev","source_workload":"tool","destination_namespace":"shop","destination_workload":"api","protocol":"icmp","port":"0"},"value":[1,"1"]}]}}"#;
    let ports = parse_denied_ports(ports).unwrap_or_else(|e| panic!("{e}"));
    let mut denied = obs("dev/tool", "shop/api", None, Observed::Deny, vec![3, 30]);
    denied.policy = Some("shop/allow-web-to-api,shop/default-deny".into());
    let split = split_by_port(
        vec![
            denied,
            obs("world", "shop/web", None, Observed::Deny, vec![1, 1]),
            obs("dev/tool", "shop/web", None, Observed::Deny, vec![0, 2]),
            obs("shop/web", "shop/api", None, Observed::Allow, vec![1, 1]),
        ],
        &ports,
    );
    let data = build(&engine(), &observations(split), 0);
    let tool_api: Vec<&MapEdge> = data
        .edges
        .iter()
        .filter(|e| e.source == "dev/tool" && e.target == "shop/api")
        .collect();
    let got: Vec<Option<u16>> = tool_api.iter().map(|e| e.port).collect();
    assert_eq!(got, [None, Some(8080), Some(9000)], "{tool_api:#?}");
    for e in &tool_api {
        assert_eq!(e.observed, [3, 30], "the edge's count on each port");
        assert_eq!(e.count_ports, ["8080", "9000", "other"]);
        assert_eq!(e.policy, "shop/allow-web-to-api,shop/default-deny");
    }
    // Explained for its own port only.
    let p9000 = tool_api[2];
    assert!(p9000.explain.contains("TCP/9000"), "{}", p9000.explain);
    assert!(!p9000.explain.contains("TCP/8080"), "{}", p9000.explain);
    // The unnamed ports: every declared port, saying why.
    assert!(
        tool_api[0]
            .explain
            .contains("ports the daemon does not name")
            && tool_api[0].explain.contains("TCP/8080")
            && tool_api[0].explain.contains("TCP/9000"),
        "{}",
        tool_api[0].explain
    );
    let world: Vec<&MapEdge> = data.edges.iter().filter(|e| e.source == "/world").collect();
    assert_eq!(world.len(), 1);
    assert_eq!(
        (world[0].port, world[0].count_ports.as_slice()),
        (None, &["other".to_owned()][..])
    );
    let learned: Vec<&MapEdge> = data
        .edges
        .iter()
        .filter(|e| e.source == "dev/tool" && e.target == "shop/web")
        .collect();
    assert_eq!(learned.len(), 1);
    assert_eq!(learned[0].port, None);
    assert!(learned[0].count_ports.is_empty());
    assert!(
        learned[0].explain.contains("names none for this edge"),
        "{}",
        learned[0].explain
    );
    let allowed: Vec<&MapEdge> = data
        .edges
        .iter()
        .filter(|e| e.verdict == "allowed")
        .collect();
    assert_eq!(allowed.len(), 1, "allowed edges are never split");
    assert!(denied_ports_query("1h").contains("deny_observer_new_denied_edges_total[1h]"));
}

#[test]
fn an_edges_file_marks_denied_counts_shared_by_the_ports_of_an_edge() {
    let mut edges = vec![
        obs("dev/tool", "shop/api", Some(8080), Observed::Deny, vec![5]),
        obs("dev/tool", "shop/api", Some(9000), Observed::Deny, vec![5]),
        obs("dev/tool", "shop/web", None, Observed::Deny, vec![2]),
        obs("shop/web", "shop/api", Some(8080), Observed::Allow, vec![1]),
    ];
    let mut ports = FilePorts::default();
    for e in &edges {
        ports.note(e);
    }
    ports.mark(&mut edges);
    assert_eq!(edges[0].count_ports, ["8080", "9000"]);
    assert_eq!(edges[1].count_ports, ["8080", "9000"]);
    assert!(edges[2].count_ports.is_empty());
    assert!(edges[3].count_ports.is_empty());
}

#[test]
fn refresh_is_bounded_when_parsed() {
    assert_eq!(parse_refresh("1s"), Ok(Duration::from_secs(1)));
    assert_eq!(parse_refresh("5s"), Ok(Duration::from_secs(5)));
    assert_eq!(parse_refresh("1h"), Ok(Duration::from_secs(3600)));
    for bad in ["0", "500ms", "61m", "30d", "9223372036854775807s"] {
        let err = parse_refresh(bad).err().unwrap_or_default();
        assert!(err.contains("out of range"), "{bad}: {err:?}");
    }
    assert!(parse_refresh("soon").is_err());

    // The flag uses it, and `--max-edges` takes a positive count.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        map: MapArgs,
    }
    let parse = |extra: &[&str]| {
        let mut args = vec!["map", "--edges", "e.jsonl", "--listen", "127.0.0.1:1"];
        args.extend_from_slice(extra);
        <Cli as clap::Parser>::try_parse_from(args).map(|c| c.map)
    };
    let defaults = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(defaults.refresh, Duration::from_secs(5));
    assert_eq!(defaults.max_edges, DEFAULT_MAX_EDGES);
    let err = parse(&["--refresh", "30d"]).err().map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("out of range")),
        "{err:?}"
    );
    assert!(parse(&["--max-edges", "0"]).is_err());
    assert_eq!(
        parse(&["--max-edges", "7"]).map(|a| a.max_edges).ok(),
        Some(7)
    );
}

#[test]
fn the_heaviest_edges_are_kept_denied_first() {
    let mut heaviest = Heaviest::new(3);
    for o in [
        obs("a/x", "b/y", Some(1), Observed::Allow, vec![0, 100]),
        obs("a/x", "b/y", Some(2), Observed::Allow, vec![0, 5]),
        obs("a/x", "b/y", Some(3), Observed::Deny, vec![0, 1]),
        obs("a/x", "b/y", Some(4), Observed::Allow, vec![0, 50]),
        obs("a/x", "b/y", Some(5), Observed::Allow, vec![0, 50]),
        obs("a/x", "b/y", Some(6), Observed::Allow, vec![0, 2]),
    ] {
        heaviest.push(o);
    }
    let (kept, left_out) = heaviest.finish();
    let ports: Vec<Option<u16>> = kept.iter().map(|o| o.port).collect();
    // The deny however light, then the heaviest allowed; of the two of 50, the first in order.
    assert_eq!(ports, [Some(1), Some(3), Some(4)]);
    assert_eq!(left_out, 3);
}

#[test]
fn an_edges_file_beyond_max_edges_keeps_the_heaviest_and_says_how_many_are_left_out() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("edges.jsonl");
    let mut text = String::new();
    for i in 0..10u64 {
        let verdict = if i == 0 { "deny" } else { "allow" };
        text.push_str(&format!(
            "{{\"source_namespace\":\"a\",\"source_workload\":\"w{i}\",\"destination_namespace\":\"b\",\"destination_workload\":\"db\",\"protocol\":\"tcp\",\"port\":{},\"observed\":{},\"verdict\":\"{verdict}\"}}\n",
            5432 + i,
            i * 10
        ));
    }
    // Two ports of one denied edge: the one kept still names both.
    text.push_str("{\"source_namespace\":\"a\",\"source_workload\":\"w0\",\"destination_namespace\":\"b\",\"destination_workload\":\"db\",\"protocol\":\"tcp\",\"port\":1,\"observed\":0,\"verdict\":\"deny\"}\n");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    let loaded = EdgeSource::File(path.clone())
        .load_blocking(4)
        .unwrap_or_else(|e| panic!("{e}"));
    let kept: Vec<(&str, u64)> = loaded
        .edges
        .iter()
        .map(|o| (o.source_workload.as_str(), o.counts[0]))
        .collect();
    assert_eq!(kept, [("w0", 0), ("w0", 0), ("w8", 80), ("w9", 90)]);
    assert_eq!(loaded.edges[0].count_ports, ["1", "5432"]);
    assert_eq!(loaded.left_out, 7);
    assert!(
        loaded
            .notes
            .iter()
            .any(|n| n.starts_with("7 of 11 edges left out")),
        "{:?}",
        loaded.notes
    );
    let data = build(&engine(), &loaded, 0);
    assert_eq!(data.edges.len(), 4);
    assert_eq!(data.edges_left_out, 7);
    let page = page::script_json(&data);
    assert!(page.contains("\"edges_left_out\":7"), "{page}");

    // Within the limit: everything, no note.
    let all = EdgeSource::File(path)
        .load_blocking(DEFAULT_MAX_EDGES)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((all.edges.len(), all.left_out), (11, 0));
    assert!(all.notes.is_empty(), "{:?}", all.notes);
}
