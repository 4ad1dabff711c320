//! Expectations marked "upstream" are taken from Kubernetes' own tests:
//! `staging/src/k8s.io/apimachinery/pkg/util/validation/validation_test.go` (names, labels,
//! ports), `pkg/apis/networking/validation/validation_test.go` (`TestValidateNetworkPolicy`)
//! and `pkg/apis/core/validation/validation_test.go` (container ports).

use serde_json::json;

use super::*;

fn np(spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": "foo", "namespace": "bar"},
        "spec": spec
    }))
    .unwrap()
}

/// The error strings of a policy with this spec.
fn np_errors(spec: serde_json::Value) -> Vec<String> {
    network_policy(&np(spec))
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn assert_one(errs: &[String], field: &str, contains: &str) {
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&format!("{field}: ")) && e.contains(contains)),
        "expected an error at {field} containing {contains:?}, got {errs:#?}"
    );
}

#[test]
fn dns1123_label_upstream() {
    let good = [
        "a".to_owned(),
        "ab".into(),
        "abc".into(),
        "a1".into(),
        "a-1".into(),
        "a--1--2--b".into(),
        "0".into(),
        "01".into(),
        "012".into(),
        "1a".into(),
        "1-a".into(),
        "1--a--b--2".into(),
        "a".repeat(63),
    ];
    for v in &good {
        assert!(
            is_dns1123_label(v).is_empty(),
            "{v}: {:?}",
            is_dns1123_label(v)
        );
    }
    let bad = [
        "".to_owned(),
        "A".into(),
        "ABC".into(),
        "aBc".into(),
        "A1".into(),
        "A-1".into(),
        "1-A".into(),
        "-".into(),
        "a-".into(),
        "-a".into(),
        "1-".into(),
        "-1".into(),
        "_".into(),
        "a_".into(),
        "_a".into(),
        "a_b".into(),
        "1_".into(),
        "_1".into(),
        "1_2".into(),
        ".".into(),
        "a.".into(),
        ".a".into(),
        "a.b".into(),
        "1.".into(),
        ".1".into(),
        "1.2".into(),
        " ".into(),
        "a ".into(),
        " a".into(),
        "a b".into(),
        "1 ".into(),
        " 1".into(),
        "1 2".into(),
        "a".repeat(64),
    ];
    for v in &bad {
        assert!(!is_dns1123_label(v).is_empty(), "{v:?} should be invalid");
    }
    assert_eq!(is_dns1123_label("a.b"), ["must not contain dots"]);
    assert_eq!(
        is_dns1123_label("a_b"),
        [
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        ]
    );
}

#[test]
fn dns1123_subdomain_upstream() {
    let good = [
        "a".to_owned(),
        "ab".into(),
        "a--1--2--b".into(),
        "012".into(),
        "1--a--b--2".into(),
        "a.a".into(),
        "a--1--2--b.a".into(),
        "a.1".into(),
        "0.a".into(),
        "1--a--b--2".into(),
        "0.1".into(),
        "a.b.c.d.e".into(),
        "aa.bb.cc.dd.ee".into(),
        "1.2.3.4.5".into(),
        "11.22.33.44.55".into(),
        "a".repeat(253),
    ];
    for v in &good {
        assert!(is_dns1123_subdomain(v).is_empty(), "{v}");
    }
    let bad = [
        "".to_owned(),
        "A".into(),
        "aBc".into(),
        "-".into(),
        "a-".into(),
        "-a".into(),
        "_".into(),
        "a_b".into(),
        ".".into(),
        "a.".into(),
        ".a".into(),
        "a..b".into(),
        "1..2".into(),
        " ".into(),
        "a b".into(),
        "A.a".into(),
        "aB.a".into(),
        "ab.A".into(),
        "0.A".into(),
        "A.B.C.D.E".into(),
        "a.B.c.d.e".into(),
        "a@b".into(),
        "a,b".into(),
        "a;b".into(),
        "a:b".into(),
        "a%b".into(),
        "a?b".into(),
        "a$b".into(),
        "a".repeat(254),
    ];
    for v in &bad {
        assert!(
            !is_dns1123_subdomain(v).is_empty(),
            "{v:?} should be invalid"
        );
    }
}

#[test]
fn label_keys_upstream() {
    let good = [
        "simple".to_owned(),
        "now-with-dashes".into(),
        "1-starts-with-num".into(),
        "1234".into(),
        "simple/simple".into(),
        "now-with-dashes/simple".into(),
        "now-with-dashes/now-with-dashes".into(),
        "now.with.dots/simple".into(),
        "now-with.dashes-and.dots/simple".into(),
        "1-num.2-num/3-num".into(),
        "1234/5678".into(),
        "1.2.3.4/5678".into(),
        "Uppercase_Is_OK_123".into(),
        "example.com/Uppercase_Is_OK_123".into(),
        "requests.storage-foo".into(),
        "a".repeat(63),
        format!("{}/{}", "a".repeat(253), "b".repeat(63)),
    ];
    for v in &good {
        assert!(is_label_key(v).is_empty(), "{v}: {:?}", is_label_key(v));
    }
    let bad = [
        "nospecialchars%^=@".to_owned(),
        "cantendwithadash-".into(),
        "-cantstartwithadash-".into(),
        "only/one/slash".into(),
        "Example.com/abc".into(),
        "example_com/abc".into(),
        "example.com/".into(),
        "/simple".into(),
        "a".repeat(64),
        format!("{}/abc", "a".repeat(254)),
    ];
    for v in &bad {
        assert!(!is_label_key(v).is_empty(), "{v:?} should be invalid");
    }
    assert_eq!(is_label_key("/simple"), ["prefix part must be non-empty"]);
    assert_eq!(
        is_label_key("example.com/"),
        [
            "name part must be non-empty",
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        ]
    );
}

#[test]
fn label_values_upstream() {
    for v in [
        "simple".to_owned(),
        "now-with-dashes".into(),
        "1-starts-with-num".into(),
        "end-with-num-1".into(),
        "1234".into(),
        "a".repeat(63),
        String::new(),
    ] {
        assert!(is_label_value(&v).is_empty(), "{v}");
    }
    for v in [
        "nospecialchars%^=@".to_owned(),
        "Tama-nui-te-rā.is.Māori.sun".into(),
        "\\backslashes\\are\\bad".into(),
        "-starts-with-dash".into(),
        "ends-with-dash-".into(),
        ".starts.with.dot".into(),
        "ends.with.dot.".into(),
        "a".repeat(64),
    ] {
        assert!(!is_label_value(&v).is_empty(), "{v:?} should be invalid");
    }
}

#[test]
fn ports_upstream() {
    for p in [1, 1000, 8080, 65535] {
        assert!(is_valid_port_num(p).is_empty(), "{p}");
    }
    for p in [0, -1, 65536, 100_000] {
        assert_eq!(
            is_valid_port_num(p),
            ["must be between 1 and 65535, inclusive"],
            "{p}"
        );
    }
    for n in [
        "telnet",
        "re-mail-ck",
        "pop3",
        "a",
        "a-1",
        "1-a",
        "a-1-b-2-c",
        "1-a-2-b-3",
    ] {
        assert!(is_valid_port_name(n).is_empty(), "{n}");
    }
    for n in [
        "longerthan15characters",
        "",
        &"a".repeat(16),
        "12345",
        "1-2-3-4",
        "-begin",
        "end-",
        "two--hyphens",
        "whois++",
    ] {
        assert!(!is_valid_port_name(n).is_empty(), "{n:?} should be invalid");
    }
}

#[test]
fn cidrs_parse_as_legacy_fields_do() {
    let p = |s: &str| parse_cidr(s).map(|n| n.to_string());
    assert_eq!(p("10.0.0.0/8").as_deref(), Some("10.0.0.0/8"));
    // Bits beyond the prefix are accepted (StrictIPCIDRValidation is off by default).
    assert_eq!(p("10.1.2.3/8").as_deref(), Some("10.0.0.0/8"));
    // Leading zeros are decimal, in octets and in the prefix length.
    assert_eq!(p("010.001.0.0/016").as_deref(), Some("10.1.0.0/16"));
    assert_eq!(p("::ffff:10.0.0.0/104").as_deref(), Some("10.0.0.0/8"));
    assert_eq!(p("::ffff:10.0.0.0/64").as_deref(), Some("0.0.0.0/0"));
    assert_eq!(p("fd00::/8").as_deref(), Some("fd00::/8"));
    for bad in [
        "",
        "10.0.0.0",
        "10.0.0.0/33",
        "10.0.0.0/",
        "/8",
        "10.0.0/8",
        "256.0.0.0/8",
        "fd00::/129",
        "10.0.0.0/-1",
        "10.0.0.0/+8",
        "x/8",
        "10.0.0.0/8/8",
    ] {
        assert_eq!(p(bad), None, "{bad:?}");
    }
    assert_eq!(parse_ip("010.0.0.1"), Some("10.0.0.1".parse().unwrap()));
    assert_eq!(
        parse_ip("::ffff:10.0.0.1"),
        Some("10.0.0.1".parse().unwrap())
    );
    assert_eq!(parse_ip("10.0.0.300"), None);
}

#[test]
fn network_policy_upstream_success_cases() {
    for spec in [
        json!({"podSelector": {"matchLabels": {"a": "b"}}, "ingress": []}),
        json!({"podSelector": {"matchLabels": {"a": "b"}}, "ingress": [{"from": [], "ports": []}]}),
        json!({"podSelector": {"matchLabels": {"a": "b"}}, "ingress": [{"ports": [
            {"port": 80}, {"protocol": "TCP"}, {"protocol": "TCP", "port": 443},
            {"protocol": "UDP", "port": "dns"}, {"protocol": "SCTP", "port": 7777},
            {"protocol": "TCP", "port": 32000, "endPort": 32768},
            {"protocol": "UDP", "port": 32000, "endPort": 32000}]}]}),
        json!({"podSelector": {"matchLabels": {"a": "b"}}, "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"c": "d"}}}]}]}),
        json!({"podSelector": {"matchLabels": {"a": "b"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"c": "d"}}}]}]}),
        json!({"podSelector": {"matchLabels": {"a": "b"}}, "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"c": "d"}}, "namespaceSelector": {"matchLabels": {"c": "d"}}}]}]}),
        json!({"podSelector": {"matchLabels": {"a": "b"}}, "ingress": [{"from": [
            {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.3.0/24", "192.168.4.0/24"]}}]}]}),
        json!({"podSelector": {"matchLabels": {"a": "b"}}, "egress": [{"to": [
            {"ipBlock": {"cidr": "fd00:192:168::/48", "except": ["fd00:192:168:3::/64", "fd00:192:168:4::/64"]}}]}]}),
        json!({"podSelector": {"matchLabels": {"a": "b"}}, "policyTypes": ["Ingress", "Egress"]}),
        json!({"podSelector": {"matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "x", "operator": "Exists"}, {"key": "y", "operator": "DoesNotExist", "values": []}]}}),
        json!({}),
    ] {
        let errs = np_errors(spec.clone());
        assert!(errs.is_empty(), "{spec}: {errs:#?}");
    }
}

#[test]
fn network_policy_upstream_error_cases() {
    let invalid_selector = json!({"NoUppercaseOrSpecialCharsLike=Equals": "b"});
    let cases = [
        // "invalid spec.podSelector"
        (
            json!({"podSelector": {"matchLabels": invalid_selector}}),
            "spec.podSelector.matchLabels",
            "Invalid value: \"NoUppercaseOrSpecialCharsLike=Equals\"",
        ),
        // "invalid ingress.ports.protocol"
        (
            json!({"ingress": [{"ports": [{"protocol": "ICMP", "port": 80}]}]}),
            "spec.ingress[0].ports[0].protocol",
            "Unsupported value: \"ICMP\": supported values: \"TCP\", \"UDP\", \"SCTP\"",
        ),
        // "invalid ingress.ports.port (int)"
        (
            json!({"ingress": [{"ports": [{"protocol": "TCP", "port": 123456789}]}]}),
            "spec.ingress[0].ports[0].port",
            "Invalid value: 123456789: must be between 1 and 65535, inclusive",
        ),
        // "invalid ingress.ports.port (str)"
        (
            json!({"ingress": [{"ports": [{"protocol": "TCP", "port": "!@#$"}]}]}),
            "spec.ingress[0].ports[0].port",
            "must contain only alpha-numeric characters",
        ),
        // "invalid ingress.from.podSelector"
        (
            json!({"ingress": [{"from": [{"podSelector": {"matchLabels": invalid_selector}}]}]}),
            "spec.ingress[0].from[0].podSelector.matchLabels",
            "Invalid value",
        ),
        // "invalid egress.to.podSelector"
        (
            json!({"egress": [{"to": [{"podSelector": {"matchLabels": invalid_selector}}]}]}),
            "spec.egress[0].to[0].podSelector.matchLabels",
            "Invalid value",
        ),
        // "invalid egress.ports.protocol"
        (
            json!({"egress": [{"ports": [{"protocol": "ICMP", "port": 80}]}]}),
            "spec.egress[0].ports[0].protocol",
            "Unsupported value",
        ),
        // "invalid ingress.from.namespaceSelector"
        (
            json!({"ingress": [{"from": [{"namespaceSelector": {"matchLabels": invalid_selector}}]}]}),
            "spec.ingress[0].from[0].namespaceSelector.matchLabels",
            "Invalid value",
        ),
        // "missing from and to type"
        (
            json!({"ingress": [{"from": [{}]}]}),
            "spec.ingress[0].from[0]",
            "Required value: must specify a peer",
        ),
        // "invalid egress.to.ipBlock"
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.169.3.0/24"]}}]}]}),
            "spec.egress[0].to[0].ipBlock.except[0]",
            "must be a strict subset of `cidr`",
        ),
        // "namespaceSelector and ipBlock"
        (
            json!({"ingress": [{"from": [{"namespaceSelector": {}, "ipBlock": {"cidr": "192.168.0.0/16"}}]}]}),
            "spec.ingress[0].from[0]",
            "Forbidden: may not specify both ipBlock and another peer",
        ),
        // "podSelector and ipBlock"
        (
            json!({"egress": [{"to": [{"podSelector": {}, "ipBlock": {"cidr": "192.168.0.0/16"}}]}]}),
            "spec.egress[0].to[0]",
            "may not specify both ipBlock and another peer",
        ),
        // "missing cidr field"
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": ""}}]}]}),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "Required value",
        ),
        // "invalid cidr format"
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "192.168.5.6"}}]}]}),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "must be a valid CIDR value",
        ),
        // "invalid ipv6 cidr format"
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "fd00:192:168::"}}]}]}),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "must be a valid CIDR value",
        ),
        // "except field is an empty string"
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "192.168.8.0/24", "except": ["", " "]}}]}]}),
            "spec.ingress[0].from[0].ipBlock.except[1]",
            "must be a valid CIDR value",
        ),
        // "except IP is outside of CIDR range"
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "192.168.8.0/24", "except": ["192.168.9.1/24"]}}]}]}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "must be a strict subset of `cidr`",
        ),
        // "except IP is not strictly within CIDR range"
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/24", "except": ["192.168.0.0/24"]}}]}]}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "must be a strict subset of `cidr`",
        ),
        // "except IPv6 is outside of CIDR range"
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "fd00:192:168:1::/64", "except": ["fd00:192:168:2::/64"]}}]}]}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "must be a strict subset of `cidr`",
        ),
        // "invalid policyTypes"
        (
            json!({"policyTypes": ["foo"]}),
            "spec.policyTypes[0]",
            "Unsupported value: \"foo\": supported values: \"Ingress\", \"Egress\"",
        ),
        // "too many policyTypes"
        (
            json!({"policyTypes": ["Egress", "Ingress", "foo"]}),
            "spec.policyTypes",
            "may not specify more than two policyTypes",
        ),
        // "multiple ports defined, one port range is invalid"
        (
            json!({"egress": [{"ports": [{"protocol": "UDP", "port": 35000, "endPort": 32768}, {"port": 80}]}]}),
            "spec.egress[0].ports[0].endPort",
            "Invalid value: 32768: must be greater than or equal to `port`",
        ),
        // "endPort defined with named/string port"
        (
            json!({"egress": [{"ports": [{"protocol": "UDP", "port": "dns", "endPort": 32768}]}]}),
            "spec.egress[0].ports[0].endPort",
            "may not be specified when `port` is non-numeric",
        ),
        // "endPort defined without port defined"
        (
            json!({"egress": [{"ports": [{"protocol": "TCP", "endPort": 32768}]}]}),
            "spec.egress[0].ports[0].endPort",
            "may not be specified when `port` is not specified",
        ),
        // "port is greater than endPort"
        (
            json!({"egress": [{"ports": [{"protocol": "SCTP", "port": 21000, "endPort": 20000}]}]}),
            "spec.egress[0].ports[0].endPort",
            "must be greater than or equal to `port`",
        ),
        // "invalid endport range defined"
        (
            json!({"egress": [{"ports": [{"protocol": "TCP", "port": 30000, "endPort": 65537}]}]}),
            "spec.egress[0].ports[0].endPort",
            "Invalid value: 65537: must be between 1 and 65535, inclusive",
        ),
    ];
    for (spec, field, contains) in cases {
        let errs = np_errors(spec.clone());
        assert_one(&errs, field, contains);
    }
}

/// The five cases issue 11 lists as silently accepted, each with its exact message.
#[test]
fn issue_cases() {
    let errs = np_errors(json!({"podSelector": {"matchLabels": {"app/x/y": "web"}}}));
    assert_one(
        &errs,
        "spec.podSelector.matchLabels",
        "Invalid value: \"app/x/y\": a valid label key",
    );

    let errs = np_errors(json!({"policyTypes": ["Ingres"]}));
    assert_eq!(
        errs,
        [
            "spec.policyTypes[0]: Unsupported value: \"Ingres\": supported values: \"Ingress\", \"Egress\""
        ]
    );

    let errs = np_errors(
        json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}),
    );
    assert_eq!(
        errs,
        [
            "spec.egress[0].to[0].ipBlock.except[0]: Invalid value: \"10.1.0.0/24\": must be a strict subset of `cidr`"
        ]
    );

    let errs = np_errors(json!({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}));
    assert_eq!(
        errs,
        [
            "spec.ingress[0].ports[0].endPort: Invalid value: 90: may not be specified when `port` is non-numeric"
        ]
    );

    let errs = np_errors(json!({"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "Exists", "values": ["web"]}]}}));
    assert_eq!(
        errs,
        [
            "spec.podSelector.matchExpressions[0].values: Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
        ]
    );
}

/// What the verdict engine used to only log (verdict/compile.rs, verdict/selector.rs): each is
/// now an error of the object.
#[test]
fn formerly_logged_cases() {
    let cases = [
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "must be a valid CIDR value",
        ),
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["nope"]}}]}]}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "must be a valid CIDR value",
        ),
        (
            json!({"ingress": [{"from": [{}]}]}),
            "spec.ingress[0].from[0]",
            "must specify a peer",
        ),
        (
            json!({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
            "spec.ingress[0].ports[0].protocol",
            "Unsupported value: \"ICMP\"",
        ),
        (
            json!({"ingress": [{"ports": [{"port": 0}]}]}),
            "spec.ingress[0].ports[0].port",
            "Invalid value: 0: must be between 1 and 65535, inclusive",
        ),
        (
            json!({"ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}),
            "spec.ingress[0].ports[0].endPort",
            "must be greater than or equal to `port`",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "spec.podSelector.matchExpressions[0].values",
            "Required value: must be specified when `operator` is 'In' or 'NotIn'",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Like", "values": ["x"]}]}}),
            "spec.podSelector.matchExpressions[0].operator",
            "Invalid value: \"Like\": not a valid selector operator",
        ),
    ];
    for (spec, field, contains) in cases {
        assert_one(&np_errors(spec), field, contains);
    }
}

#[test]
fn selector_keys_and_values() {
    let errs = np_errors(
        json!({"ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "-bad", "operator": "In", "values": ["ok", "not ok"]}]}}]}]}),
    );
    assert_one(
        &errs,
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].key",
        "Invalid value: \"-bad\": name part must consist of",
    );
    assert_one(
        &errs,
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values[1]",
        "Invalid value: \"not ok\": a valid label must be an empty string",
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
}

#[test]
fn metadata_rules() {
    let mut p = np(json!({}));
    p.metadata.name = Some("Bad_Name".into());
    p.metadata.namespace = Some("a.b".into());
    p.metadata.labels = Some([("ok".to_owned(), "-no".to_owned())].into());
    p.metadata.annotations = Some(
        [
            ("Example.com/x".to_owned(), "v".to_owned()),
            ("bad key".to_owned(), "v".to_owned()),
        ]
        .into(),
    );
    let errs: Vec<String> = network_policy(&p).iter().map(ToString::to_string).collect();
    assert_one(
        &errs,
        "metadata.name",
        "Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain",
    );
    assert_one(
        &errs,
        "metadata.namespace",
        "Invalid value: \"a.b\": must not contain dots",
    );
    assert_one(&errs, "metadata.labels", "Invalid value: \"-no\"");
    // Annotation keys are checked in lower case, as upstream does: only the space is wrong.
    assert_one(&errs, "metadata.annotations", "Invalid value: \"bad key\"");
    assert_eq!(errs.len(), 4, "{errs:#?}");

    let errs = network_policy(&NetworkPolicy::default());
    assert_eq!(
        errs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "metadata.name: Required value: name or generateName is required",
            "metadata.namespace: Required value"
        ]
    );

    let big = "x".repeat(ANNOTATIONS_MAX_BYTES);
    let mut p = np(json!({}));
    p.metadata.annotations = Some([("k".to_owned(), big)].into());
    assert_eq!(
        network_policy(&p)[0].to_string(),
        "metadata.annotations: Too long: may not be more than 262144 bytes"
    );
}

#[test]
fn namespaces() {
    let ns = |v: serde_json::Value| -> core::Namespace { serde_json::from_value(v).unwrap() };
    assert!(
        namespace(&ns(
            json!({"metadata": {"name": "prod", "labels": {"team": "a"}}})
        ))
        .is_empty()
    );
    let errs = namespace(&ns(json!({"metadata": {"name": "prod.eu"}})));
    assert_eq!(
        errs[0].to_string(),
        "metadata.name: Invalid value: \"prod.eu\": must not contain dots"
    );
    let errs = namespace(&ns(json!({"metadata": {"name": "Prod"}})));
    assert_eq!(errs.len(), 1);
    let errs = namespace(&ns(
        json!({"metadata": {"name": "a", "labels": {"a/b/c": "x"}}}),
    ));
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].field, "metadata.labels");
}

#[test]
fn pods() {
    let pd = |v: serde_json::Value| -> core::Pod { serde_json::from_value(v).unwrap() };
    let good = pd(json!({
        "metadata": {"name": "web-1", "namespace": "prod", "labels": {"app": "web"}},
        "spec": {"containers": [
            {"name": "a", "ports": [{"containerPort": 80, "name": "http"}, {"containerPort": 53, "protocol": "UDP"}]},
            {"name": "b", "ports": [{"containerPort": 8080, "name": "http"}]}]},
        "status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
    }));
    assert!(
        pod(&good, PodLayout::AsWritten).is_empty(),
        "{:?}",
        pod(&good, PodLayout::AsWritten)
    );

    // Upstream `validateContainerPorts` cases: zero/huge port, bad name, duplicate name in one
    // container, unsupported protocol.
    let bad = pd(json!({
        "metadata": {"name": "web-1", "namespace": "prod"},
        "spec": {"containers": [{"name": "a", "ports": [
            {"containerPort": 0},
            {"containerPort": 65536},
            {"containerPort": 80, "name": "a.b"},
            {"containerPort": 81, "name": "p"},
            {"containerPort": 82, "name": "p"},
            {"containerPort": 83, "protocol": "tcp"}]}]},
        "status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}, {"ip": "nope"}]}
    }));
    let errs: Vec<String> = pod(&bad, PodLayout::AsWritten)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_one(
        &errs,
        "spec.containers[0].ports[0].containerPort",
        "Required value",
    );
    assert_one(
        &errs,
        "spec.containers[0].ports[1].containerPort",
        "Invalid value: 65536",
    );
    assert_one(
        &errs,
        "spec.containers[0].ports[2].name",
        "Invalid value: \"a.b\"",
    );
    assert_one(
        &errs,
        "spec.containers[0].ports[4].name",
        "Duplicate value: \"p\"",
    );
    assert_one(
        &errs,
        "spec.containers[0].ports[5].protocol",
        "Unsupported value: \"tcp\"",
    );
    assert_one(
        &errs,
        "status.podIPs[2]",
        "Invalid value: \"nope\": must be a valid IP address",
    );
    assert_one(
        &errs,
        "status.podIPs",
        "may specify no more than one IP for each IP family",
    );
    assert_eq!(errs.len(), 7, "{errs:#?}");

    // Trimmed pods carry every container's ports in one: duplicates are not errors there.
    let errs = pod(&bad, PodLayout::Trimmed);
    assert_eq!(errs.len(), 6, "{errs:#?}");

    let only_pod_ip = pd(json!({"metadata": {"name": "a", "namespace": "b"},
        "status": {"podIP": "10.0.0.300"}}));
    assert_eq!(
        pod(&only_pod_ip, PodLayout::AsWritten)[0].to_string(),
        "status.podIP: Invalid value: \"10.0.0.300\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
    );

    let two_v4 = pd(json!({"metadata": {"name": "a", "namespace": "b"},
        "status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]}}));
    assert_eq!(pod(&two_v4, PodLayout::AsWritten).len(), 1);
}

#[test]
fn invalid_object_labels_and_counts() {
    let o = |kind: &str| InvalidObject {
        kind: kind.to_owned(),
        namespace: Some("n".into()),
        name: Some("x".into()),
        source: None,
        errors: vec!["e".into()],
    };
    assert_eq!(o("NetworkPolicy").metric_kind(), "networkpolicies");
    assert_eq!(o("Pod").metric_kind(), "pods");
    assert_eq!(o("Namespace").metric_kind(), "namespaces");
    assert_eq!(o("ReplicaSet").metric_kind(), "replicasets");
    let counts = counts_by_kind(&[o("Pod"), o("Pod"), o("Job")]);
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [
            ("jobs".to_owned(), 1),
            ("namespaces".into(), 0),
            ("networkpolicies".into(), 0),
            ("pods".into(), 2)
        ]
    );
    assert_eq!(o("Pod").to_string(), "Pod n/x: e");
}

#[test]
fn names_and_values_in_messages_are_escaped_and_cut_short() {
    assert_eq!(printable("web-0"), "web-0");
    assert_eq!(printable("a\u{0}b\u{1b}[2J"), "a\\u{0}b\\u{1b}[2J");
    let long = "x".repeat(1_000_000);
    let shown = printable(&long);
    assert!(shown.len() < 300, "{}", shown.len());
    assert!(shown.ends_with("… (999800 more bytes)"), "{shown}");
    // A huge invalid label value is quoted short in the field error too.
    let mut ns = k8s_openapi::api::core::v1::Namespace::default();
    ns.metadata.name = Some("a".into());
    ns.metadata.labels = Some([("k".to_owned(), "v!".repeat(500_000))].into());
    let errors = namespace(&ns);
    assert!(!errors.is_empty());
    let text = errors[0].to_string();
    assert!(text.len() < 1_000, "{}", text.len());
    assert!(text.contains("more bytes"), "{text}");
}
