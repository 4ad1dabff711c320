//! Privileged tests of the simulated node itself, on the real kernel: the traffic helpers send
//! exactly what they say, nftables drops and counts exactly that, allowed traffic arrives, and
//! nothing is left behind. The daemon's end-to-end tests rely on all of this.

use std::net::SocketAddr;
use std::process::Command;

use testkit::simnode::{
    EGRESS_DROP_COUNTER, Enforcement, INGRESS_DROP_COUNTER, NETNS_PREFIX, Proto, Rule, SimNode,
    cleanup_stale, owner_pid,
};

fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(out.status.success(), "ip {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nft_drops_exactly_what_was_sent_v4_and_v6() {
    if !testkit::privileged("nft_drops_exactly_what_was_sent_v4_and_v6") {
        return;
    }
    let mut node = SimNode::new().expect("simulated node");
    let client = node.add_pod("a", "client").unwrap();
    let server = node.add_pod("b", "server").unwrap();
    let intruder = node.add_pod("a", "intruder").unwrap();
    let locked = node.add_pod("a", "locked").unwrap();

    let tcp = Rule {
        from: client,
        to: server,
        protocol: Proto::Tcp,
        port: 8080,
    };
    let udp = Rule {
        from: client,
        to: server,
        protocol: Proto::Udp,
        port: 5353,
    };
    let locked_tcp = Rule {
        from: locked,
        to: server,
        protocol: Proto::Tcp,
        port: 8080,
    };
    let mut policy = Enforcement::default();
    policy.ingress_isolated.insert(server);
    policy.egress_isolated.insert(locked);
    policy.allow(tcp).allow(udp).allow(locked_tcp);
    node.enforce(&policy).unwrap();

    let tcp_l = node.listen(server, Proto::Tcp, 8080).unwrap();
    let udp_l = node.listen(server, Proto::Udp, 5353).unwrap();
    let srv = node.pod(server).unwrap().clone();
    let at = |v6: bool, port: u16| SocketAddr::new(srv.ip(v6), port);

    // Allowed: arrives, counted by the allow rules only.
    for v6 in [false, true] {
        for _ in 0..3 {
            node.tcp_exchange(client, at(v6, 8080)).unwrap();
        }
        let r = node.send_udp(client, at(v6, 5353), 4).unwrap();
        assert_eq!(r.sent, 4);
    }
    node.tcp_exchange(locked, at(false, 8080)).unwrap();

    // Denied at the server's ingress.
    let mut expect_ingress = 0;
    for (v6, syns, datagrams) in [(false, 5, 6), (true, 4, 7)] {
        let r = node.send_tcp_syns(intruder, at(v6, 8080), syns).unwrap();
        assert_eq!((r.sent, r.refused_locally), (syns, 0));
        let r = node.send_udp(intruder, at(v6, 5353), datagrams).unwrap();
        assert_eq!((r.sent, r.refused_locally), (datagrams, 0));
        // The client's UDP is only allowed on 5353.
        let r = node.send_udp(client, at(v6, 5354), 2).unwrap();
        assert_eq!(r.sent, 2);
        expect_ingress += syns + datagrams + 2;
    }
    // Denied at the locked pod's own egress: sendto/connect see EPERM, nothing leaves.
    let r = node.send_udp(locked, at(true, 5353), 3).unwrap();
    assert_eq!((r.sent, r.refused_locally), (0, 3));
    let r = node.send_tcp_syns(locked, at(false, 9090), 2).unwrap();
    assert_eq!(r.sent + r.refused_locally, 2);

    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        node.counter(server, INGRESS_DROP_COUNTER).unwrap().packets,
        expect_ingress
    );
    assert_eq!(
        node.counter(locked, EGRESS_DROP_COUNTER).unwrap().packets,
        5
    );
    // Conntrack passes all but the first packet of a TCP connection; UDP without replies stays
    // NEW, so every datagram hits the rule.
    assert_eq!(
        node.counter(server, &tcp.ingress_counter())
            .unwrap()
            .packets,
        6
    );
    assert_eq!(
        node.counter(server, &udp.ingress_counter())
            .unwrap()
            .packets,
        8
    );
    assert_eq!(
        node.counter(server, &locked_tcp.ingress_counter())
            .unwrap()
            .packets,
        1
    );
    assert_eq!(
        node.counter(locked, &locked_tcp.egress_counter())
            .unwrap()
            .packets,
        1
    );
    assert_eq!(tcp_l.received(), 7);
    assert_eq!(udp_l.received(), 8);
    // Pods that are not isolated drop nothing.
    assert_eq!(
        node.counter(client, INGRESS_DROP_COUNTER).unwrap().packets,
        0
    );
    assert_eq!(
        node.counter(intruder, EGRESS_DROP_COUNTER).unwrap().packets,
        0
    );
}

#[test]
fn drop_removes_everything() {
    if !testkit::privileged("drop_removes_everything") {
        return;
    }
    let mut node = SimNode::new().unwrap();
    node.add_pod("x", "p1").unwrap();
    node.add_pod("y", "p2").unwrap();
    let tag = node.tag().to_owned();
    let bridge = node.bridge().to_owned();
    let mut policy = Enforcement::default();
    policy.ingress_isolated.insert(0);
    node.enforce(&policy).unwrap();
    assert!(ip_output(&["netns", "list"]).contains(&tag));
    assert!(ip_output(&["-o", "link", "show"]).contains(&bridge));
    drop(node);
    assert!(!ip_output(&["netns", "list"]).contains(&tag));
    assert!(!ip_output(&["-o", "link", "show"]).contains(&tag));
}

#[test]
fn cleanup_stale_removes_only_dead_owners() {
    if !testkit::privileged("cleanup_stale_removes_only_dead_owners") {
        return;
    }
    // A pid that does not run: the last one below pid_max that has no /proc entry.
    let dead = (100_000u32..4_000_000)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    // Encoded in base 36 and padded to 5 digits, as SimNode does; "zz" is the node counter.
    let mut n = dead;
    let mut digits = Vec::new();
    while n > 0 {
        digits.push(std::char::from_digit(n % 36, 36).unwrap());
        n /= 36;
    }
    let b36: String = digits.iter().rev().collect();
    let dead_tag = format!("{b36:0>5}zz");
    let stale_ns = format!("{NETNS_PREFIX}{dead_tag}-0");
    assert_eq!(owner_pid(&stale_ns), Some(dead));
    let stale_br = format!("do-br{dead_tag}");
    assert!(
        Command::new("ip")
            .args(["netns", "add", &stale_ns])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("ip")
            .args(["link", "add", &stale_br, "type", "bridge"])
            .status()
            .unwrap()
            .success()
    );
    let live = SimNode::new().unwrap();

    let removed = cleanup_stale().unwrap();
    assert!(removed.contains(&stale_ns), "{removed:?}");
    assert!(removed.contains(&stale_br), "{removed:?}");
    assert!(!ip_output(&["netns", "list"]).contains(&stale_ns));
    assert!(ip_output(&["-o", "link", "show"]).contains(live.bridge()));
}
