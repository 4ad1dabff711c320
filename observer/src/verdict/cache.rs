//! Memoized verdicts per flow key, for one engine generation.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::sync::Arc;

use super::{Engine, FlowQuery, Peer, Verdict};
use crate::flow::{FastMap, FastSet, IpFamily, Protocol};
use crate::inventory::{Pod, PodDelta};

/// Identity of one endpoint in a cache key: plain data, so that a lookup (one per flow at
/// every drain) builds its key without touching a reference count.
///
/// A pod is identified by the address of its `Arc`: the cache holds entries of one engine
/// generation only, in which each pod object stands for one pod, and each entry keeps its
/// pods alive (see `Entry`), so an address cannot be reused by another pod while an entry
/// names it. Two `Arc`s of the same pod are merely two entries.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum EndpointKey {
    /// A pod of the inventory, by the address of its `Arc`.
    Pod(usize),
    /// An external address.
    Ip(IpAddr),
}

impl EndpointKey {
    /// The key of a pod of the inventory.
    pub fn pod(pod: &Arc<Pod>) -> Self {
        EndpointKey::Pod(pod_id(pod))
    }

    fn of(peer: &Peer) -> Self {
        match peer {
            Peer::Pod(p) => EndpointKey::Pod(pod_id(p)),
            Peer::External(ip) => EndpointKey::Ip(*ip),
        }
    }
}

fn pod_id(pod: &Arc<Pod>) -> usize {
    Arc::as_ptr(pod) as usize
}

/// Cache key: source, destination, protocol, port, address family.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    /// Source endpoint.
    pub src: EndpointKey,
    /// Destination endpoint.
    pub dst: EndpointKey,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port (0 for port-less protocols, whose port policies ignore).
    pub port: u16,
    /// The flow's address family ([`FlowQuery::family`]): the two families of a dual-stack
    /// pair may get different verdicts from an ipBlock.
    pub family: Option<IpFamily>,
    /// [`FlowQuery::own_node`]: whether an address is the node's can change while the pods
    /// at the two ends do not (a host-network pod starts on it), so it is part of the key.
    pub own_node: bool,
}

impl VerdictKey {
    /// The key of a flow between `src` and `dst`; the port counts only for protocols that
    /// have ports (policies ignore it for the others).
    pub fn new(
        src: EndpointKey,
        dst: EndpointKey,
        protocol: Protocol,
        port: u16,
        family: Option<IpFamily>,
        own_node: bool,
    ) -> Self {
        VerdictKey {
            src,
            dst,
            protocol,
            port: if protocol.has_ports() { port } else { 0 },
            family,
            own_node,
        }
    }

    /// The key of a query.
    pub fn of(flow: &FlowQuery) -> Self {
        Self::new(
            EndpointKey::of(&flow.src),
            EndpointKey::of(&flow.dst),
            flow.protocol,
            flow.port,
            flow.family,
            flow.own_node,
        )
    }
}

/// A cached verdict and the pods its key names by address, held so that those addresses stay
/// theirs while the entry exists.
#[derive(Debug)]
struct Entry {
    verdict: Arc<Verdict>,
    pods: [Option<Arc<Pod>>; 2],
}

fn pod_of(peer: &Peer) -> Option<Arc<Pod>> {
    match peer {
        Peer::Pod(p) => Some(Arc::clone(p)),
        Peer::External(_) => None,
    }
}

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    map: FastMap<VerdictKey, Entry>,
    /// The verdict evaluated last. A new verdict equal to it shares its allocation: a scan's
    /// ports, or many peers refused by one policy, then hold one `Arc`, whose count and fields
    /// stay in the CPU's cache while a drain clones and reads it for each of thousands of
    /// flows (a separate allocation per flow was a cache miss per flow, twice).
    last: Option<Arc<Verdict>>,
    /// The last verdict that holds for every port ([`Verdict::port_independent`]), under its
    /// key: a flow of the same endpoints and protocol on another port takes it without a
    /// lookup. A scan's thousands of ports against a pod that no port rule covers (no policy,
    /// or a default deny) are then one lookup per drain, not one cold lookup per port.
    any_port: Option<(VerdictKey, Entry)>,
}

/// A bounded verdict cache. Entries belong to one [`Engine::generation`]: the first lookup
/// with an engine of another generation (a new inventory) empties the cache. When full, the
/// cache is emptied too: flows that matter come back within a scrape interval, and a
/// wholesale reset keeps the cost of bookkeeping at zero on the hot path.
#[derive(Debug)]
pub struct VerdictCache {
    capacity: usize,
    /// A `RefCell`, not a lock: the cache belongs to the pipeline thread, and a lock taken and
    /// released per lookup was two atomic operations per flow at every drain, each a fence
    /// that kept the next flows' cache misses from overlapping.
    inner: RefCell<Inner>,
    /// Set by an invalidation that found the cache borrowed (impossible while no method holds
    /// a borrow across a call, as now): the next lookup then forgets every verdict rather
    /// than serve one the invalidation meant to drop.
    stale: Cell<bool>,
}

impl VerdictCache {
    /// A cache holding at most `capacity` verdicts (at least 1).
    pub fn new(capacity: usize) -> Self {
        VerdictCache {
            capacity: capacity.max(1),
            inner: RefCell::new(Inner::default()),
            stale: Cell::new(false),
        }
    }

    /// The cached verdict for `flow`, evaluating it with `engine` on a miss.
    pub fn get_or_evaluate(&self, engine: &Engine, flow: &FlowQuery) -> Arc<Verdict> {
        self.get_or_evaluate_key(engine, VerdictKey::of(flow), || flow.clone())
    }

    /// [`VerdictCache::get_or_evaluate`] for the flow `key` names (it must be
    /// `VerdictKey::of(&query())`), building the query only on a miss. A drain looks up
    /// thousands of flows; a query holds two pods, and cloning them for a hit was four
    /// reference-count updates per flow, each a fence that kept the next flows' cache misses
    /// from overlapping.
    pub fn get_or_evaluate_key(
        &self,
        engine: &Engine,
        key: VerdictKey,
        query: impl FnOnce() -> FlowQuery,
    ) -> Arc<Verdict> {
        let Ok(mut inner) = self.inner.try_borrow_mut() else {
            // Only a lookup from within a lookup could find the cache borrowed: answer it
            // without the cache.
            return Arc::new(engine.evaluate(&query()));
        };
        let inner = &mut *inner;
        let stale = self.stale.replace(false);
        if stale || inner.generation != engine.generation() {
            inner.map.clear();
            inner.any_port = None;
            inner.generation = engine.generation();
        } else {
            if let Some((k, e)) = &inner.any_port
                && (k.src, k.dst, k.protocol, k.family, k.own_node)
                    == (key.src, key.dst, key.protocol, key.family, key.own_node)
            {
                return Arc::clone(&e.verdict);
            }
            if let Some(e) = inner.map.get(&key) {
                let verdict = Arc::clone(&e.verdict);
                if verdict.port_independent() {
                    let entry = Entry {
                        verdict: Arc::clone(&verdict),
                        pods: e.pods.clone(),
                    };
                    inner.any_port = Some((key, entry));
                }
                return verdict;
            }
        }
        let flow = &query();
        debug_assert_eq!(key, VerdictKey::of(flow));
        let verdict = engine.evaluate(flow);
        let verdict = match &inner.last {
            Some(last) if **last == verdict => Arc::clone(last),
            _ => {
                let verdict = Arc::new(verdict);
                inner.last = Some(Arc::clone(&verdict));
                verdict
            }
        };
        if inner.map.len() >= self.capacity {
            inner.map.clear();
        }
        let pods = [pod_of(&flow.src), pod_of(&flow.dst)];
        if verdict.port_independent() {
            let entry = Entry {
                verdict: Arc::clone(&verdict),
                pods: pods.clone(),
            };
            inner.any_port = Some((key, entry));
        }
        inner.map.insert(
            key,
            Entry {
                verdict: Arc::clone(&verdict),
                pods,
            },
        );
        verdict
    }

    /// Number of cached verdicts.
    pub fn len(&self) -> usize {
        self.inner.try_borrow().map_or(0, |inner| inner.map.len())
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the verdicts that involve a pod of `delta`: flows from or to a removed pod, and
    /// flows from or to an address of a removed or added pod (an address that was no pod's, or
    /// another pod's, before). Every other verdict stays: it reads no other pod.
    pub fn invalidate(&self, delta: &PodDelta) -> usize {
        if delta.is_empty() {
            return 0;
        }
        let pods: FastSet<usize> = delta.removed.iter().map(pod_id).collect();
        let ips: FastSet<IpAddr> = delta.addresses().collect();
        let involved = |e: &EndpointKey| match e {
            EndpointKey::Pod(p) => pods.contains(p),
            EndpointKey::Ip(ip) => ips.contains(&ip.to_canonical()),
        };
        let Ok(mut inner) = self.inner.try_borrow_mut() else {
            self.stale.set(true);
            return 0;
        };
        if inner
            .any_port
            .as_ref()
            .is_some_and(|(k, _)| involved(&k.src) || involved(&k.dst))
        {
            inner.any_port = None;
        }
        let before = inner.map.len();
        inner
            .map
            .retain(|k, _| !involved(&k.src) && !involved(&k.dst));
        before - inner.map.len()
    }

    /// Drops every entry.
    pub fn clear(&self) {
        match self.inner.try_borrow_mut() {
            Ok(mut inner) => {
                inner.map.clear();
                inner.any_port = None;
            }
            Err(_) => self.stale.set(true),
        }
    }
}
