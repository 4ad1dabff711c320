//! `PolicyDenied` Events against a fake API server (tower-test): create, deduplication and the
//! PATCH of the repeat, rate limiting, disabling. Each request's method, path and body are
//! asserted.

#![allow(
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::pin::pin;
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use observer::export::events::{
    DeniedTraffic, EventMetrics, EventsConfig, Outcome, PeerRef, PodRef, PolicyDeniedEvents,
    SpikeNotice, SpikePhase,
};
use observer::flow::{Direction, Protocol};
use serde_json::Value;
use tower_test::mock::{self, Handle};

type MockHandle = Handle<Request<Body>, Response<Body>>;

fn denied(peer: &str, packets: u64) -> DeniedTraffic {
    DeniedTraffic {
        pod: PodRef {
            namespace: "prod".into(),
            name: "db-0".into(),
            uid: Some("0b1c".into()),
        },
        direction: Direction::Ingress,
        protocol: Protocol::Tcp,
        port: Some(5432),
        peer: PeerRef {
            namespace: "dev".into(),
            workload: peer.into(),
            kind: "Deployment".into(),
        },
        packets,
        window: Duration::from_secs(60),
        isolating_policies: vec!["prod/default-deny-ingress".into()],
        nearest_misses: vec!["prod/allow-web-to-db (allows app=web only)".into()],
        first_packet: None,
    }
}

/// Receives the next request, checks method and path, answers with the request body echoed
/// (what the API server does for a create or a merge patch), and returns that body.
async fn expect(handle: &mut MockHandle, method: Method, path: &str) -> Value {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("no request within 5s")
        .expect("service dropped");
    assert_eq!(request.method(), method);
    assert_eq!(request.uri().path(), path);
    let bytes = request.into_body().collect_bytes().await.expect("body");
    let body: Value = serde_json::from_slice(&bytes).expect("json body");
    let mut echoed = body.clone();
    echoed["apiVersion"] = "events.k8s.io/v1".into();
    echoed["kind"] = "Event".into();
    send.send_response(
        Response::builder()
            .status(if method == Method::POST { 201 } else { 200 })
            .body(Body::from(serde_json::to_vec(&echoed).expect("encode")))
            .expect("response"),
    );
    body
}

fn publisher(config: EventsConfig) -> (PolicyDeniedEvents, MockHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let metrics = EventMetrics::new().expect("metrics");
    (PolicyDeniedEvents::new(client, config, metrics), handle)
}

#[tokio::test]
async fn create_then_deduplicate_then_patch() {
    let config = EventsConfig {
        dedup_window: Duration::from_millis(400),
        instance: Some("node-a".into()),
        ..EventsConfig::default()
    };
    let (events, handle) = publisher(config);
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let created = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events",
        )
        .await;
        assert_eq!(created["type"], "Warning");
        assert_eq!(created["reason"], "PolicyDenied");
        assert_eq!(created["reportingController"], "deny-observer");
        assert_eq!(created["reportingInstance"], "node-a");
        assert_eq!(created["regarding"]["kind"], "Pod");
        assert_eq!(created["regarding"]["namespace"], "prod");
        assert_eq!(created["regarding"]["name"], "db-0");
        assert_eq!(created["regarding"]["uid"], "0b1c");
        assert_eq!(created["related"]["kind"], "Deployment");
        assert_eq!(created["related"]["apiVersion"], "apps/v1");
        assert_eq!(created["related"]["name"], "client");
        assert_eq!(
            created["note"],
            "Denied 37 TCP/5432 packets from dev/client (Deployment) in 1m: isolated by \
             prod/default-deny-ingress; nearest miss prod/allow-web-to-db (allows app=web only)"
        );
        assert!(
            created.get("series").is_none_or(Value::is_null),
            "{created}"
        );
        let name = created["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        assert!(name.starts_with("db-0."), "{name}");

        // A different peer on the same pod is its own Event, not a patch of the first.
        let other = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events",
        )
        .await;
        assert_eq!(other["related"]["name"], "batch");
        assert_ne!(other["metadata"]["name"], created["metadata"]["name"]);

        // The repeat of the first key, after its window: a PATCH of the same Event.
        let patched = expect(
            &mut handle,
            Method::PATCH,
            &format!("/apis/events.k8s.io/v1/namespaces/prod/events/{name}"),
        )
        .await;
        assert_eq!(patched["series"]["count"], 2);
        assert_eq!(patched["reason"], "PolicyDenied");
        assert_eq!(patched["related"]["name"], "client");
    });

    assert_eq!(
        events.record(denied("client", 37)).await,
        Outcome::Published
    );
    // Within the window: accumulated, no request (the server task would see it out of order).
    assert_eq!(
        events.record(denied("client", 5)).await,
        Outcome::Deduplicated
    );
    assert_eq!(
        events.record(denied("client", 6)).await,
        Outcome::Deduplicated
    );
    assert_eq!(events.record(denied("batch", 1)).await, Outcome::Published);
    // Nothing is due yet.
    assert!(events.flush().await.is_empty());
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(events.flush().await, vec![Outcome::Published]);
    // The quiet key ("batch") and the flushed one are forgotten after a quiet window.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(events.flush().await.is_empty());
    server.await.expect("server assertions");

    let m = events.metrics();
    assert_eq!(m.get("published"), 3);
    assert_eq!(m.get("deduplicated"), 2);
    assert_eq!(m.get("failed"), 0);
}

#[tokio::test]
async fn rate_limit_holds_back_then_flush_publishes() {
    let config = EventsConfig {
        burst: 1,
        per_minute: 600, // one token every 100 ms
        ..EventsConfig::default()
    };
    let (events, handle) = publisher(config);
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let first = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events",
        )
        .await;
        assert_eq!(first["related"]["name"], "a");
        let second = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events",
        )
        .await;
        assert_eq!(second["related"]["name"], "b");
        // Held back twice, so its packets accumulated: 2 + 3.
        assert!(
            second["note"]
                .as_str()
                .expect("note")
                .starts_with("Denied 5 TCP/5432"),
            "{second}"
        );
    });
    assert_eq!(events.record(denied("a", 1)).await, Outcome::Published);
    assert_eq!(events.record(denied("b", 2)).await, Outcome::RateLimited);
    assert_eq!(events.record(denied("b", 3)).await, Outcome::RateLimited);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(events.flush().await, vec![Outcome::Published]);
    server.await.expect("server assertions");
    assert_eq!(events.metrics().get("rate_limited"), 2);
}

#[tokio::test]
async fn api_errors_are_counted_not_fatal() {
    let (events, handle) = publisher(EventsConfig::default());
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (request, send) = handle.next_request().await.expect("request");
        assert_eq!(request.method(), Method::POST);
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "events is forbidden", "reason": "Forbidden", "code": 403
        });
        send.send_response(
            Response::builder()
                .status(403)
                .body(Body::from(serde_json::to_vec(&status).expect("encode")))
                .expect("response"),
        );
    });
    assert_eq!(events.record(denied("client", 1)).await, Outcome::Failed);
    server.await.expect("server");
    assert_eq!(events.metrics().get("failed"), 1);
    // Retried next window, not on every summary.
    assert_eq!(
        events.record(denied("client", 1)).await,
        Outcome::Deduplicated
    );
}

#[tokio::test]
async fn spike_events_on_the_workload() {
    let (events, handle) = publisher(EventsConfig::default());
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let start = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events",
        )
        .await;
        assert_eq!(start["type"], "Warning");
        assert_eq!(start["reason"], "DenySpikeStarted");
        assert_eq!(start["regarding"]["kind"], "StatefulSet");
        assert_eq!(start["regarding"]["apiVersion"], "apps/v1");
        assert_eq!(start["regarding"]["name"], "db");
        assert_eq!(
            start["note"],
            "Deny spike started on prod/db (StatefulSet): 120 denied packets/min (baseline 3/min); \
             top peer dev/client"
        );
        let end = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events",
        )
        .await;
        assert_eq!(end["type"], "Normal");
        assert_eq!(end["reason"], "DenySpikeEnded");
    });
    let mut notice = SpikeNotice {
        namespace: "prod".into(),
        kind: "StatefulSet".into(),
        name: "db".into(),
        phase: SpikePhase::Started,
        denied_per_minute: 120.0,
        baseline_per_minute: 3.0,
        detail: Some("top peer dev/client".into()),
    };
    assert_eq!(events.spike(&notice).await, Outcome::Published);
    notice.phase = SpikePhase::Ended;
    notice.denied_per_minute = 2.0;
    assert_eq!(events.spike(&notice).await, Outcome::Published);
    server.await.expect("server assertions");
}

#[tokio::test]
async fn disabled_sends_nothing() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let config = EventsConfig {
        enabled: false,
        ..EventsConfig::default()
    };
    let events = PolicyDeniedEvents::new(client, config, EventMetrics::new().expect("metrics"));
    assert_eq!(events.record(denied("client", 1)).await, Outcome::Disabled);
    assert!(events.flush().await.is_empty());
    drop(events);
    // The client (and so the service) is gone; no request was ever made.
    assert!(handle.next_request().await.is_none());
}

#[tokio::test]
async fn sink_queues_without_blocking() {
    let config = EventsConfig::default();
    let (events, handle) = publisher(config);
    let metrics = events.metrics().clone();
    let queue_full = prometheus::IntCounter::new("queue_full", "t").expect("counter");
    let (sink, _task) = events.spawn(8, Duration::from_secs(60), queue_full.clone());
    assert!(sink.denied(denied("client", 4)));
    let mut handle = pin!(handle);
    let created = expect(
        &mut handle,
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/prod/events",
    )
    .await;
    assert!(
        created["note"]
            .as_str()
            .expect("note")
            .starts_with("Denied 4 TCP/5432")
    );
    // Let the task count the outcome after the response.
    for _ in 0..50 {
        if metrics.get("published") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.get("published"), 1);
    assert_eq!(queue_full.get(), 0);
}

/// A one-pod inventory (prod/db-0 of Deployment db, 10.0.0.10) behind an ingress default deny.
fn db_views() -> observer::attribute::Views {
    use observer::inventory::{Pod, PodPhase, Workload};

    views_of(Pod {
        namespace: "prod".into(),
        name: "db-0".into(),
        labels: [("app".to_owned(), "db".to_owned())].into(),
        ips: vec!["10.0.0.10".parse().expect("address")],
        host_network: false,
        node_name: None,
        phase: PodPhase::Running,
        uid: None,
        created_unix: 0,
        ports: vec![],
        workload: Workload {
            kind: "Deployment".into(),
            name: "db".into(),
        },
    })
}

/// `pod` (at 10.0.0.10 in prod) behind an ingress default deny in prod.
fn views_of(pod: observer::inventory::Pod) -> observer::attribute::Views {
    use observer::inventory::{Inventory, Namespace, NodeAddrs};
    use std::sync::Arc;

    let policy = serde_yaml::from_str(
        "metadata: {name: default-deny-ingress, namespace: prod}\n\
         spec: {podSelector: {}, policyTypes: [Ingress]}",
    )
    .expect("policy");
    let inv = Inventory {
        namespaces: [(
            "prod".to_owned(),
            Namespace {
                name: "prod".into(),
                labels: [("kubernetes.io/metadata.name".to_owned(), "prod".to_owned())].into(),
            },
        )]
        .into(),
        pods: vec![Arc::new(pod)],
        policies: vec![Arc::new(policy)],
        ..Inventory::default()
    };
    observer::attribute::Views::new(Arc::new(inv), NodeAddrs::new([]))
}

/// One denied flow from 8.8.8.8 to the db pod's port 5432.
fn denied_drain(packets: u64) -> observer::capture::DrainReport {
    observer::capture::DrainReport {
        drops: vec![observer::capture::FlowDrop {
            reason: "netfilter_drop".into(),
            src: Some("8.8.8.8".parse().expect("address")),
            dst: Some("10.0.0.10".parse().expect("address")),
            protocol: Protocol::Tcp,
            dst_port: 5432,
            icmp: None,
            netns: 0,
            packets,
            bytes: packets * 60,
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn drained_denies_become_events_counted_over_the_drain_window() {
    use observer::attribute::{Attribution, Sink as _};
    use std::time::SystemTime;

    let (events, handle) = publisher(EventsConfig::default());
    let queue_full = prometheus::IntCounter::new("queue_full", "t").expect("counter");
    let (mut sink, task) = events.spawn(8, Duration::from_secs(60), queue_full.clone());
    let views = db_views();
    let start = SystemTime::now();
    let mut core = Attribution::new(true, start);
    let out = core.attribute(
        &views,
        &denied_drain(6),
        &[],
        start + Duration::from_secs(2),
    );
    sink.record(out, start + Duration::from_secs(2));
    let mut handle = pin!(handle);
    let created = expect(
        &mut handle,
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/prod/events",
    )
    .await;
    assert_eq!(created["regarding"]["name"], "db-0");
    assert_eq!(created["reason"], "PolicyDenied");
    assert_eq!(
        created["note"],
        "Denied 6 TCP/5432 packets from world in 2s: isolated by prod/default-deny-ingress"
    );
    // The last sink gone, the publisher flushes and ends.
    drop(sink);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("publisher ends")
        .expect("publisher task");
    assert_eq!(queue_full.get(), 0);
}

#[tokio::test]
async fn a_full_queue_is_counted_not_waited_for() {
    use observer::attribute::{Attribution, Sink as _};
    use std::time::SystemTime;

    let (events, _handle) = publisher(EventsConfig::default());
    let queue_full = prometheus::IntCounter::new("queue_full", "t").expect("counter");
    // The fake API server never answers: the publisher holds at most one summary in flight
    // and one in the queue.
    let (mut sink, _task) = events.spawn(1, Duration::from_secs(60), queue_full.clone());
    let views = db_views();
    let start = SystemTime::now();
    let mut core = Attribution::new(true, start);
    for i in 1..=5u32 {
        let now = start + Duration::from_secs(u64::from(i));
        let out = core.attribute(&views, &denied_drain(1), &[], now);
        sink.record(out, now);
    }
    assert!(
        (3..=4).contains(&queue_full.get()),
        "5 summaries, room for at most 2: {}",
        queue_full.get()
    );
}

/// The Event's `regarding` carries the pod's UID: `kubectl describe pod` looks Events up by
/// `involvedObject.uid` too, so an Event without it is never shown there. For a mirror pod
/// (a static pod) kubectl looks them up by its `kubernetes.io/config.mirror` annotation.
#[tokio::test]
async fn events_carry_the_uid_kubectl_describe_looks_up() {
    use observer::attribute::{Attribution, Sink as _};
    use observer::inventory::{OwnerIndex, convert};
    use std::time::SystemTime;

    for (annotations, want) in [
        (
            serde_json::json!({}),
            "5e0c2a1e-0d4c-4b7e-9a51-2f4f8b1c7d10",
        ),
        (
            serde_json::json!({"kubernetes.io/config.mirror": "8b1c7d10c0ffee"}),
            "8b1c7d10c0ffee",
        ),
    ] {
        let k8s: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db-0", "namespace": "prod", "labels": {"app": "db"},
                         "uid": "5e0c2a1e-0d4c-4b7e-9a51-2f4f8b1c7d10",
                         "annotations": annotations},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.10"}
        }))
        .expect("pod");
        let pod = convert::pod(&k8s, &OwnerIndex::default()).expect("convert");
        let (events, handle) = publisher(EventsConfig::default());
        let queue_full = prometheus::IntCounter::new("queue_full", "t").expect("counter");
        let (mut sink, task) = events.spawn(8, Duration::from_secs(60), queue_full);
        let views = views_of(pod);
        let start = SystemTime::now();
        let mut core = Attribution::new(true, start);
        let now = start + Duration::from_secs(1);
        sink.record(core.attribute(&views, &denied_drain(1), &[], now), now);
        let mut handle = pin!(handle);
        let created = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events",
        )
        .await;
        assert_eq!(created["regarding"]["name"], "db-0");
        assert_eq!(created["regarding"]["uid"], want, "{created}");
        drop(sink);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("publisher ends")
            .expect("publisher task");
    }
}

/// Answers the next request with an API error `code` and returns the request's method.
async fn refuse(handle: &mut MockHandle, code: u16, reason: &str) -> Method {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("no request within 5s")
        .expect("service dropped");
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "refused", "reason": reason, "code": code
    });
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&status).expect("encode")))
            .expect("response"),
    );
    request.method().clone()
}

/// Pod names may have 253 characters; kube-rs named Events `<pod>.<16 hex digits>`, 270
/// characters, which the API server refuses. The Event's own name is cut (and hashed), its
/// `regarding` still names the pod in full, with its UID.
#[tokio::test]
async fn events_of_pods_with_253_character_names_have_valid_names() {
    let pod_name = format!("{}-{}", "a".repeat(200), "b".repeat(52));
    assert_eq!(pod_name.len(), 253);
    let config = EventsConfig {
        // Node names may have 253 characters too; `reportingInstance` may have 128.
        instance: Some(format!("node-{}", "n".repeat(248))),
        ..EventsConfig::default()
    };
    let (events, handle) = publisher(config);
    let expected_pod = pod_name.clone();
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let created = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events",
        )
        .await;
        let name = created["metadata"]["name"].as_str().expect("name");
        assert!(name.len() <= 253, "{} characters: {name}", name.len());
        assert!(
            observer::inventory::validate::is_dns1123_subdomain(name).is_empty(),
            "{name}"
        );
        assert!(name.starts_with("aaaa"), "{name}");
        assert_eq!(created["regarding"]["kind"], "Pod");
        assert_eq!(created["regarding"]["name"], expected_pod.as_str());
        assert_eq!(created["regarding"]["uid"], "0b1c");
        let instance = created["reportingInstance"].as_str().expect("instance");
        assert!(instance.len() <= 128, "{instance}");
        assert!(instance.starts_with("node-nnn"), "{instance}");
    });
    let mut d = denied("client", 3);
    d.pod.name = pod_name;
    assert_eq!(events.record(d).await, Outcome::Published);
    server.await.expect("server assertions");
    assert_eq!(events.metrics().get("published"), 1);
}

/// An Event the API server refuses (422: invalid) is counted as failed and not sent again
/// before its window ends: neither the next summary nor a flush makes a request.
#[tokio::test]
async fn a_refused_event_is_counted_and_not_retried_before_its_window_ends() {
    let config = EventsConfig {
        dedup_window: Duration::from_millis(300),
        ..EventsConfig::default()
    };
    let (events, handle) = publisher(config);
    let mut handle = Box::pin(handle);
    let (outcome, method) = tokio::join!(
        events.record(denied("client", 1)),
        refuse(&mut handle, 422, "Invalid")
    );
    assert_eq!((outcome, method), (Outcome::Failed, Method::POST));
    assert_eq!(events.metrics().get("failed"), 1);
    for _ in 0..20 {
        assert_eq!(
            events.record(denied("client", 1)).await,
            Outcome::Deduplicated
        );
        assert!(events.flush().await.is_empty());
    }
    let quiet = tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await;
    assert!(quiet.is_err(), "a request was made within the window");
    // The window over, the accumulated summary is tried once more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (outcomes, method) = tokio::join!(events.flush(), refuse(&mut handle, 422, "Invalid"));
    assert_eq!((outcomes, method), (vec![Outcome::Failed], Method::POST));
    assert_eq!(events.metrics().get("failed"), 2);
}

/// The repeat of an Event the API server no longer has (its event TTL passed, or someone
/// deleted it) is created anew rather than failing on every window.
#[tokio::test]
async fn a_repeat_of_an_expired_event_creates_a_new_one() {
    let config = EventsConfig {
        dedup_window: Duration::from_millis(200),
        ..EventsConfig::default()
    };
    let (events, handle) = publisher(config);
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let first = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events",
        )
        .await;
        let name = first["metadata"]["name"].as_str().expect("name").to_owned();
        assert_eq!(refuse(&mut handle, 404, "NotFound").await, Method::PATCH);
        let second = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events",
        )
        .await;
        assert_ne!(second["metadata"]["name"].as_str(), Some(name.as_str()));
        assert!(second.get("series").is_none_or(Value::is_null), "{second}");
    });
    assert_eq!(events.record(denied("client", 1)).await, Outcome::Published);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(events.record(denied("client", 1)).await, Outcome::Published);
    server.await.expect("server assertions");
    assert_eq!(events.metrics().get("failed"), 0);
}
