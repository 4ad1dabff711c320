//! Compiled Kubernetes label selectors (`matchLabels` + `matchExpressions`).

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::inventory::Labels;

/// One `matchExpressions` requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Requirement {
    /// `key In (values)`.
    In(String, Vec<String>),
    /// `key NotIn (values)`: also true when the key is absent, as in Kubernetes.
    NotIn(String, Vec<String>),
    /// `key Exists`.
    Exists(String),
    /// `key DoesNotExist`.
    DoesNotExist(String),
}

/// A compiled label selector. An empty selector selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Selector {
    /// `matchLabels`, sorted by key.
    pub(crate) labels: Vec<(String, String)>,
    /// `matchExpressions`, in order.
    pub(crate) requirements: Vec<Requirement>,
    /// Set when the selector is invalid (unknown operator, `In` without values): Kubernetes
    /// rejects such selectors, and CNIs that meet one select nothing rather than everything.
    pub(crate) invalid: bool,
}

impl Selector {
    /// Compiles a selector. Invalid parts are reported through `warn` and make the selector
    /// match nothing.
    pub(crate) fn compile(sel: &LabelSelector, mut warn: impl FnMut(String)) -> Self {
        let mut out = Selector {
            labels: sel
                .match_labels
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Selector::default()
        };
        for req in sel.match_expressions.iter().flatten() {
            let values = req.values.clone().unwrap_or_default();
            let compiled = match req.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    warn(format!(
                        "matchExpressions {} {} needs at least one value",
                        req.key, req.operator
                    ));
                    out.invalid = true;
                    continue;
                }
                "In" => Requirement::In(req.key.clone(), values),
                "NotIn" => Requirement::NotIn(req.key.clone(), values),
                "Exists" => Requirement::Exists(req.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(req.key.clone()),
                other => {
                    warn(format!(
                        "matchExpressions key {:?}: unknown operator {other:?}",
                        req.key
                    ));
                    out.invalid = true;
                    continue;
                }
            };
            out.requirements.push(compiled);
        }
        out
    }

    /// True for `{}`, which selects every object.
    pub(crate) fn is_empty(&self) -> bool {
        !self.invalid && self.labels.is_empty() && self.requirements.is_empty()
    }

    /// Whether `labels` satisfy the selector.
    pub(crate) fn matches(&self, labels: &Labels) -> bool {
        if self.invalid {
            return false;
        }
        self.labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
            && self.requirements.iter().all(|r| match r {
                Requirement::In(k, vs) => labels
                    .get(k)
                    .is_some_and(|have| vs.iter().any(|v| v == have)),
                Requirement::NotIn(k, vs) => labels
                    .get(k)
                    .is_none_or(|have| vs.iter().all(|v| v != have)),
                Requirement::Exists(k) => labels.contains_key(k),
                Requirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }

    /// If the selector only pins `kubernetes.io/metadata.name`, the namespace it names.
    pub(crate) fn single_namespace_name(&self) -> Option<&str> {
        const NAME: &str = "kubernetes.io/metadata.name";
        match (self.labels.as_slice(), self.requirements.as_slice()) {
            ([(k, v)], []) if k == NAME => Some(v),
            ([], [Requirement::In(k, vs)]) if k == NAME && vs.len() == 1 => {
                vs.first().map(String::as_str)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Selector {
    /// Kubernetes selector syntax: `app=web, tier in (a,b), !legacy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.invalid {
            return f.write_str("<invalid selector>");
        }
        let mut parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.requirements {
            parts.push(match r {
                Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            });
        }
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| (*v).to_owned()).collect())
            },
        }
    }

    fn sel(ml: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> Selector {
        let ls = LabelSelector {
            match_labels: if ml.is_empty() {
                None
            } else {
                Some(labels(ml).to_btree_map())
            },
            match_expressions: if exprs.is_empty() { None } else { Some(exprs) },
        };
        Selector::compile(&ls, |_| {})
    }

    #[test]
    fn empty_selects_everything() {
        let s = sel(&[], vec![]);
        assert!(s.is_empty());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_all_must_hold() {
        let s = sel(&[("app", "web"), ("tier", "fe")], vec![]);
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "fe"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "fe")])));
    }

    #[test]
    fn operators() {
        let is_in = sel(&[], vec![expr("env", "In", &["a", "b"])]);
        assert!(is_in.matches(&labels(&[("env", "b")])));
        assert!(!is_in.matches(&labels(&[("env", "c")])));
        assert!(!is_in.matches(&labels(&[])));

        let not_in = sel(&[], vec![expr("env", "NotIn", &["a"])]);
        assert!(not_in.matches(&labels(&[("env", "b")])));
        assert!(
            not_in.matches(&labels(&[])),
            "NotIn holds when the key is absent"
        );
        assert!(!not_in.matches(&labels(&[("env", "a")])));

        let exists = sel(&[], vec![expr("env", "Exists", &[])]);
        assert!(exists.matches(&labels(&[("env", "")])));
        assert!(!exists.matches(&labels(&[("other", "x")])));

        let dne = sel(&[], vec![expr("env", "DoesNotExist", &[])]);
        assert!(dne.matches(&labels(&[("other", "x")])));
        assert!(!dne.matches(&labels(&[("env", "x")])));
    }

    #[test]
    fn labels_and_expressions_combine_with_and() {
        let s = sel(&[("app", "web")], vec![expr("env", "NotIn", &["prod"])]);
        assert!(s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "db")])));
    }

    #[test]
    fn invalid_selects_nothing_and_warns() {
        let mut warnings = Vec::new();
        let ls = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("env", "Like", &["a"])]),
        };
        let s = Selector::compile(&ls, |w| warnings.push(w));
        assert!(!s.matches(&labels(&[("env", "a")])));
        assert!(!s.is_empty());
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("Like"), "{warnings:?}");
    }

    #[test]
    fn display() {
        let s = sel(
            &[("app", "web")],
            vec![
                expr("env", "In", &["a", "b"]),
                expr("x", "Exists", &[]),
                expr("y", "DoesNotExist", &[]),
            ],
        );
        assert_eq!(s.to_string(), "app=web, env in (a,b), x, !y");
    }
}
