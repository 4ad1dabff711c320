//! Memoized verdicts per flow key, for one engine generation.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use super::{Engine, FlowQuery, Peer, Verdict};
use crate::flow::Protocol;

/// Identity of one endpoint in a cache key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EndpointKey {
    /// A pod, by namespace and name (its labels/IPs are fixed for one engine generation).
    Pod(Arc<str>, Arc<str>),
    /// An external address.
    Ip(IpAddr),
}

impl EndpointKey {
    fn of(peer: &Peer) -> Self {
        match peer {
            Peer::Pod(p) => EndpointKey::Pod(p.namespace.as_str().into(), p.name.as_str().into()),
            Peer::External(ip) => EndpointKey::Ip(*ip),
        }
    }
}

/// Cache key: source, destination, protocol, port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source endpoint.
    pub src: EndpointKey,
    /// Destination endpoint.
    pub dst: EndpointKey,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port (0 for port-less protocols, whose port policies ignore).
    pub port: u16,
}

impl FlowKey {
    /// The key of a query.
    pub fn of(flow: &FlowQuery) -> Self {
        FlowKey {
            src: EndpointKey::of(&flow.src),
            dst: EndpointKey::of(&flow.dst),
            protocol: flow.protocol,
            port: if flow.protocol.has_ports() {
                flow.port
            } else {
                0
            },
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    map: HashMap<FlowKey, Arc<Verdict>>,
}

/// A bounded verdict cache. Entries belong to one [`Engine::generation`]: the first lookup
/// with an engine of another generation (a new inventory) empties the cache. When full, the
/// cache is emptied too: flows that matter come back within a scrape interval, and a
/// wholesale reset keeps the cost of bookkeeping at zero on the hot path.
#[derive(Debug)]
pub struct VerdictCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl VerdictCache {
    /// A cache holding at most `capacity` verdicts (at least 1).
    pub fn new(capacity: usize) -> Self {
        VerdictCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The cached verdict for `flow`, evaluating it with `engine` on a miss.
    pub fn get_or_evaluate(&self, engine: &Engine, flow: &FlowQuery) -> Arc<Verdict> {
        let key = FlowKey::of(flow);
        {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if inner.generation != engine.generation() {
                inner.map.clear();
                inner.generation = engine.generation();
            } else if let Some(v) = inner.map.get(&key) {
                return Arc::clone(v);
            }
        }
        // Evaluate outside the lock so that concurrent misses do not serialize.
        let verdict = Arc::new(engine.evaluate(flow));
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.generation == engine.generation() {
            if inner.map.len() >= self.capacity {
                inner.map.clear();
            }
            inner.map.insert(key, Arc::clone(&verdict));
        }
        verdict
    }

    /// Number of cached verdicts.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .clear();
    }
}
