//! Typed label sets: each metric family's labels are the fields of one struct, and its label
//! names come from the same declaration, so names and values cannot drift apart. Code that
//! needs a particular label (overflow folding, expiry) finds it by name.

use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use super::ExportError;
use crate::attribute::PolicyMatch;
use crate::flow::{Direction, Protocol};

/// A value that renders as a label value.
pub trait LabelValue {
    /// The label value.
    fn label_value(&self) -> &str;
}

impl LabelValue for &str {
    fn label_value(&self) -> &str {
        self
    }
}

impl LabelValue for Direction {
    fn label_value(&self) -> &str {
        self.label()
    }
}

impl LabelValue for Protocol {
    fn label_value(&self) -> &str {
        self.label()
    }
}

impl LabelValue for PolicyMatch {
    fn label_value(&self) -> &str {
        self.label()
    }
}

/// The labels of one metric family, as a struct.
pub trait LabelSet<const N: usize> {
    /// Label names, in the order of [`LabelSet::values`].
    const NAMES: [&'static str; N];
    /// Label values.
    fn values(&self) -> [&str; N];
}

/// A label set named independently of the lifetime of its values: implemented by the
/// `'static` instance of each label-set struct, so that a metric's type can name its labels
/// while each sample borrows its values for as short as it likes.
pub trait Labelled<const N: usize>: 'static {
    /// The label set with values borrowed for `'a`.
    type Set<'a>: LabelSet<N>;
}

/// Label names of the family `L`.
pub fn names<L: Labelled<N>, const N: usize>() -> [&'static str; N] {
    <L::Set<'static> as LabelSet<N>>::NAMES
}

/// Position of label `name` in `L`'s label names.
pub(crate) fn position<L: Labelled<N>, const N: usize>(
    metric: &str,
    name: &str,
) -> Result<usize, ExportError> {
    names::<L, N>()
        .iter()
        .position(|n| *n == name)
        .ok_or_else(|| ExportError::UnknownLabel {
            metric: metric.to_owned(),
            label: name.to_owned(),
        })
}

/// Declares a label-set struct whose fields are label values, with the label name of each.
macro_rules! label_set {
    (
        $(#[$meta:meta])*
        pub struct $name:ident <$lt:lifetime> {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty => $label:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
        pub struct $name<$lt> {
            $( $(#[$fmeta])* pub $field: $ty ),+
        }

        impl<$lt> $crate::export::labels::LabelSet<{ [$($label),+].len() }> for $name<$lt> {
            const NAMES: [&'static str; { [$($label),+].len() }] = [$($label),+];
            fn values(&self) -> [&str; { [$($label),+].len() }] {
                [$( $crate::export::labels::LabelValue::label_value(&self.$field) ),+]
            }
        }

        impl $crate::export::labels::Labelled<{ [$($label),+].len() }> for $name<'static> {
            type Set<'a> = $name<'a>;
        }
    };
}
#[cfg(test)]
pub(crate) use label_set;

label_set! {
    /// Labels of `deny_observer_drops_total` and `deny_observer_drop_bytes_total`.
    pub struct DropLabels<'a> {
        /// Kernel drop reason, lower case, without the `SKB_DROP_REASON_` prefix.
        reason: &'a str => "reason",
        /// Direction (from the verdict when there is one).
        direction: Direction => "direction",
        /// Source namespace ("" for addresses that are no pod's).
        source_namespace: &'a str => "source_namespace",
        /// Source workload, or a non-pod value (`node`, `host`, `world`, `private`).
        source_workload: &'a str => "source_workload",
        /// Destination namespace.
        destination_namespace: &'a str => "destination_namespace",
        /// Destination workload.
        destination_workload: &'a str => "destination_workload",
        /// Protocol.
        protocol: Protocol => "protocol",
    }
}

label_set! {
    /// Labels of `deny_observer_policy_denies_total`.
    pub struct PolicyDenyLabels<'a> {
        /// Deciding direction.
        direction: Direction => "direction",
        /// Source namespace.
        source_namespace: &'a str => "source_namespace",
        /// Source workload.
        source_workload: &'a str => "source_workload",
        /// Destination namespace.
        destination_namespace: &'a str => "destination_namespace",
        /// Destination workload.
        destination_workload: &'a str => "destination_workload",
        /// Protocol.
        protocol: Protocol => "protocol",
        /// Isolating policies, as built by [`super::policy_label`].
        policy: &'a str => "policy",
        /// Why it counts as a deny.
        policy_match: PolicyMatch => "match",
    }
}

label_set! {
    /// `{reason}` of the per-reason kernel totals.
    pub struct ReasonLabels<'a> {
        /// Kernel drop reason.
        reason: &'a str => "reason",
    }
}

label_set! {
    /// `{stage}` of `deny_observer_events_lost_total`.
    pub struct StageLabels<'a> {
        /// Where the loss happened.
        stage: &'a str => "stage",
    }
}

label_set! {
    /// `{kind}` of the inventory gauges.
    pub struct KindLabels<'a> {
        /// Object kind (`pods`, `namespaces`, `networkpolicies`).
        kind: &'a str => "kind",
    }
}

label_set! {
    /// `{result}` of `deny_observer_inventory_reloads_total`.
    pub struct ResultLabels<'a> {
        /// `ok` or `error`.
        result: &'a str => "result",
    }
}

label_set! {
    /// `{resource}` of `deny_observer_inventory_watch_errors_total`.
    pub struct ResourceLabels<'a> {
        /// Watched resource.
        resource: &'a str => "resource",
    }
}

label_set! {
    /// `{metric}` of the series accounting.
    pub struct MetricLabels<'a> {
        /// Name of the bounded metric.
        metric: &'a str => "metric",
    }
}

label_set! {
    /// Labels of `deny_observer_build_info`.
    pub struct BuildInfoLabels<'a> {
        /// deny-observer version.
        version: &'a str => "version",
        /// Kernel release.
        kernel_release: &'a str => "kernel_release",
        /// Node name.
        node: &'a str => "node",
    }
}

/// A metric vector whose label names come from the label set `L` (of `N` labels).
pub(crate) struct Typed<V, L, const N: usize> {
    vec: V,
    _labels: std::marker::PhantomData<fn(&L)>,
}

/// Counters labelled by `L`.
pub(crate) type Counters<L, const N: usize> = Typed<IntCounterVec, L, N>;
/// Gauges labelled by `L`.
pub(crate) type Gauges<L, const N: usize> = Typed<IntGaugeVec, L, N>;

impl<B: MetricVecBuilder, L, const N: usize> Typed<MetricVec<B>, L, N> {
    /// The untyped vector (to register, collect or reset it).
    pub(crate) fn vec(&self) -> &MetricVec<B> {
        &self.vec
    }
}

impl<L: Labelled<N>, const N: usize> Typed<IntCounterVec, L, N> {
    /// Counters named `name`, labelled by `L`.
    pub(crate) fn new(name: &str, help: &str) -> Result<Self, ExportError> {
        let vec =
            IntCounterVec::new(Opts::new(name, help), &names::<L, N>()).map_err(|source| {
                ExportError::Register {
                    name: name.to_owned(),
                    source,
                }
            })?;
        Ok(Self {
            vec,
            _labels: std::marker::PhantomData,
        })
    }

    /// The counter of one label set.
    pub(crate) fn with(&self, labels: &L::Set<'_>) -> IntCounter {
        self.vec.with_label_values(labels.values().as_slice())
    }
}

impl<L: Labelled<N>, const N: usize> Typed<IntGaugeVec, L, N> {
    /// Gauges named `name`, labelled by `L`.
    pub(crate) fn new(name: &str, help: &str) -> Result<Self, ExportError> {
        let vec = IntGaugeVec::new(Opts::new(name, help), &names::<L, N>()).map_err(|source| {
            ExportError::Register {
                name: name.to_owned(),
                source,
            }
        })?;
        Ok(Self {
            vec,
            _labels: std::marker::PhantomData,
        })
    }

    /// The gauge of one label set.
    pub(crate) fn with(&self, labels: &L::Set<'_>) -> IntGauge {
        self.vec.with_label_values(labels.values().as_slice())
    }
}
