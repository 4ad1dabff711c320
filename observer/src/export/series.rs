//! Bounded families of labelled counters: a cache of counter handles per label set, a series
//! limit with an overflow bucket, and expiry of series whose workloads are gone.
//!
//! The cache is keyed by owned label values but looked up with borrowed `[&str; N]`, so
//! recording into an existing series allocates nothing. A family is typed by its label set;
//! the labels it folds on overflow and checks on expiry are given by name.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec};

use super::ExportError;
use super::labels::{LabelSet, Labelled, position};
use crate::flow::FastMap;

/// Label value that replaces namespaces, workloads and policies in overflow series.
pub const OVERFLOW: &str = "__overflow__";

/// Workload values that name no pod (attribution's stable values for other addresses). Series
/// carrying them are never expired.
pub const NON_POD_WORKLOADS: &[&str] = &["node", "host", "world", "private", "unknown"];

/// Label values of one series, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OwnedKey<const N: usize>([Box<str>; N]);

/// A view of `N` label values, so that owned and borrowed keys hash and compare alike.
trait KeyView<const N: usize> {
    fn part(&self, i: usize) -> &str;
}

impl<const N: usize> KeyView<N> for OwnedKey<N> {
    fn part(&self, i: usize) -> &str {
        &self.0[i]
    }
}

impl<const N: usize> KeyView<N> for [&str; N] {
    fn part(&self, i: usize) -> &str {
        self[i]
    }
}

impl<'a, const N: usize> Borrow<dyn KeyView<N> + 'a> for OwnedKey<N> {
    fn borrow(&self) -> &(dyn KeyView<N> + 'a) {
        self
    }
}

impl<const N: usize> Hash for dyn KeyView<N> + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        for i in 0..N {
            self.part(i).hash(state);
        }
    }
}

impl<const N: usize> PartialEq for dyn KeyView<N> + '_ {
    fn eq(&self, other: &Self) -> bool {
        (0..N).all(|i| self.part(i) == other.part(i))
    }
}

impl<const N: usize> Eq for dyn KeyView<N> + '_ {}

impl<const N: usize> Hash for OwnedKey<N> {
    // Must hash exactly like `dyn KeyView<N>`, or borrowed lookups would miss.
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn KeyView<N>).hash(state);
    }
}

impl<const N: usize> OwnedKey<N> {
    fn new(values: &[&str; N]) -> Self {
        Self(values.map(Box::from))
    }

    fn as_refs(&self) -> [&str; N] {
        std::array::from_fn(|i| &*self.0[i])
    }
}

/// One cached series: a handle per counter of the family, and since when its workloads are gone.
struct Entry {
    handles: Vec<IntCounter>,
    gone_since: Option<Instant>,
}

struct State<const N: usize> {
    entries: FastMap<OwnedKey<N>, Entry>,
    overflow: FastMap<OwnedKey<N>, Vec<IntCounter>>,
}

/// What [`Family::record`] did with a sample.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Counted on its existing series.
    Existing,
    /// Counted on a new series; the family now holds this many.
    New(usize),
    /// The limit was reached: counted on the overflow series.
    Overflow,
}

/// Names of a (namespace, workload) label pair, e.g. `("source_namespace", "source_workload")`.
pub(crate) type EndpointLabels = (&'static str, &'static str);

/// Counters sharing one label set `L` (e.g. drops and drop bytes), bounded and expiring
/// together.
pub(crate) struct Family<L, const N: usize> {
    vecs: Vec<IntCounterVec>,
    /// Positions of the labels replaced by [`OVERFLOW`] in overflow series.
    overflow_positions: Vec<usize>,
    /// (namespace, workload) positions checked by expiry.
    endpoints: [(usize, usize); 2],
    limit: usize,
    state: Mutex<State<N>>,
    _labels: std::marker::PhantomData<fn(&L)>,
}

impl<L: Labelled<N>, const N: usize> Family<L, N> {
    /// A family of `vecs` (each labelled by `L`) holding at most `limit` series; beyond it,
    /// the labels named `overflow` become [`OVERFLOW`]. Series expire when a workload named
    /// by one of the `endpoints` label pairs is gone. Fails when a name is not one of `L`'s.
    pub(crate) fn new(
        metric: &str,
        vecs: Vec<IntCounterVec>,
        overflow: &[&str],
        endpoints: [EndpointLabels; 2],
        limit: usize,
    ) -> Result<Self, ExportError> {
        let overflow_positions = overflow
            .iter()
            .map(|name| position::<L, N>(metric, name))
            .collect::<Result<_, _>>()?;
        let pair = |(ns, wl): EndpointLabels| -> Result<(usize, usize), ExportError> {
            Ok((position::<L, N>(metric, ns)?, position::<L, N>(metric, wl)?))
        };
        Ok(Self {
            vecs,
            overflow_positions,
            endpoints: [pair(endpoints[0])?, pair(endpoints[1])?],
            limit,
            state: Mutex::new(State {
                entries: FastMap::default(),
                overflow: FastMap::default(),
            }),
            _labels: std::marker::PhantomData,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<N>> {
        // A panic while holding the lock leaves consistent data (maps of handles), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handles(&self, values: &[&str; N]) -> Vec<IntCounter> {
        self.vecs
            .iter()
            .map(|v| v.with_label_values(values.as_slice()))
            .collect()
    }

    /// Adds `increments[i]` to counter `i` of the series `values`, or of its overflow series
    /// when the family already holds `limit` series.
    pub(crate) fn record(&self, labels: &L::Set<'_>, increments: &[u64]) -> Recorded {
        let values = labels.values();
        let mut state = self.lock();
        let key: &dyn KeyView<N> = &values;
        if let Some(entry) = state.entries.get(key) {
            add(&entry.handles, increments);
            return Recorded::Existing;
        }
        if state.entries.len() < self.limit {
            let handles = self.handles(&values);
            add(&handles, increments);
            state.entries.insert(
                OwnedKey::new(&values),
                Entry {
                    handles,
                    gone_since: None,
                },
            );
            return Recorded::New(state.entries.len());
        }
        let mut folded = values;
        for &i in &self.overflow_positions {
            folded[i] = OVERFLOW;
        }
        let key: &dyn KeyView<N> = &folded;
        if let Some(handles) = state.overflow.get(key) {
            add(handles, increments);
        } else {
            let handles = self.handles(&folded);
            add(&handles, increments);
            state.overflow.insert(OwnedKey::new(&folded), handles);
        }
        Recorded::Overflow
    }

    /// Number of series below the limit (overflow series not included).
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Number of overflow series.
    pub(crate) fn overflow_len(&self) -> usize {
        self.lock().overflow.len()
    }

    /// Marks series whose source or destination workload is not `live` as gone, and removes
    /// those gone for at least `grace`. Returns how many were removed.
    pub(crate) fn retain(
        &self,
        now: Instant,
        grace: Duration,
        live: &dyn Fn(&str, &str) -> bool,
    ) -> usize {
        let mut state = self.lock();
        let before = state.entries.len();
        state.entries.retain(|key, entry| {
            let alive = self.endpoints.iter().all(|&(ns, wl)| {
                let (ns, wl) = (key.part(ns), key.part(wl));
                exempt(ns, wl) || live(ns, wl)
            });
            if alive {
                entry.gone_since = None;
                return true;
            }
            let since = *entry.gone_since.get_or_insert(now);
            if now.saturating_duration_since(since) < grace {
                return true;
            }
            let refs = key.as_refs();
            for vec in &self.vecs {
                // The series exists unless someone else removed it; nothing to do then.
                let _ = vec.remove_label_values(refs.as_slice());
            }
            false
        });
        before - state.entries.len()
    }
}

/// True for endpoints that are not pods of a workload: they are never expired.
fn exempt(namespace: &str, workload: &str) -> bool {
    namespace.is_empty()
        || workload.is_empty()
        || namespace == OVERFLOW
        || workload == OVERFLOW
        || NON_POD_WORKLOADS.contains(&workload)
}

fn add(handles: &[IntCounter], increments: &[u64]) {
    for (h, &n) in handles.iter().zip(increments) {
        h.inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::labels::label_set;
    use prometheus::Opts;

    label_set! {
        /// Test labels, deliberately not in the order the family names them.
        pub struct Test<'a> {
            r: &'a str => "r",
            ns: &'a str => "ns",
            wl: &'a str => "wl",
        }
    }

    fn t<'a>(ns: &'a str, wl: &'a str, r: &'a str) -> Test<'a> {
        Test { r, ns, wl }
    }

    fn family(limit: usize) -> Family<Test<'static>, 3> {
        let vec =
            IntCounterVec::new(Opts::new("t_total", "t"), &Test::NAMES).expect("valid metric");
        Family::new(
            "t_total",
            vec![vec],
            &["ns", "wl"],
            [("ns", "wl"), ("ns", "wl")],
            limit,
        )
        .expect("known labels")
    }

    #[test]
    fn unknown_label_names_are_an_error() {
        let vec =
            IntCounterVec::new(Opts::new("t_total", "t"), &Test::NAMES).expect("valid metric");
        let err = Family::<Test<'static>, 3>::new(
            "t_total",
            vec![vec],
            &["namespace"],
            [("ns", "wl"); 2],
            1,
        )
        .err()
        .expect("unknown label");
        assert!(err.to_string().contains("namespace"), "{err}");
    }

    #[test]
    fn borrowed_lookup_finds_owned_key() {
        let f = family(10);
        assert_eq!(f.record(&t("a", "b", "c"), &[1]), Recorded::New(1));
        assert_eq!(f.record(&t("a", "b", "c"), &[2]), Recorded::Existing);
        assert_eq!(f.len(), 1);
        assert_eq!(f.vecs[0].with_label_values(&["c", "a", "b"]).get(), 3);
        // Same concatenation, different split: must be a different series.
        f.record(&t("ab", "", "c"), &[1]);
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn overflow_folds_the_named_labels() {
        let f = family(1);
        f.record(&t("a", "b", "x"), &[1]);
        assert_eq!(f.record(&t("c", "d", "x"), &[5]), Recorded::Overflow);
        assert_eq!(f.record(&t("e", "f", "y"), &[7]), Recorded::Overflow);
        assert_eq!(f.record(&t("g", "h", "x"), &[1]), Recorded::Overflow);
        assert_eq!(f.len(), 1);
        assert_eq!(f.overflow_len(), 2);
        let v = &f.vecs[0];
        assert_eq!(v.with_label_values(&["x", OVERFLOW, OVERFLOW]).get(), 6);
        assert_eq!(v.with_label_values(&["y", OVERFLOW, OVERFLOW]).get(), 7);
    }

    #[test]
    fn expiry_checks_the_named_workload_labels() {
        let f = family(10);
        f.record(&t("a", "gone", "x"), &[1]);
        f.record(&t("a", "live", "x"), &[1]);
        let now = Instant::now();
        let live = |_: &str, wl: &str| wl == "live";
        assert_eq!(f.retain(now, Duration::from_secs(1), &live), 0, "grace");
        assert_eq!(
            f.retain(now + Duration::from_secs(1), Duration::from_secs(1), &live),
            1
        );
        assert_eq!(f.len(), 1);
    }
}
