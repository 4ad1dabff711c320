//! The `events.k8s.io/v1` writer behind [`PolicyDeniedEvents`](super::PolicyDeniedEvents).
//!
//! It does what kube-rs's `Recorder` does (create an Event, then PATCH its `series` when the
//! same Event recurs) with the one difference that made it necessary: kube names an Event
//! `<object name>.<timestamp in hex>`, 17 characters more than the object's name, so every
//! Event of a pod whose name is over 236 characters (pod names may have 253) was refused by
//! the API server (`metadata.name: must be no more than 253 characters`). Here a name that
//! does not fit is cut and given a hash of the whole name ([`event_name`]); the Event's
//! `regarding` keeps the object's full name and UID, so `kubectl describe` still finds it.
//!
//! Fields the API server bounds are bounded here too: `reportingInstance` (the node name,
//! which may have 253 characters) to 128 bytes; `action`, `reason` and `note` by the caller.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Longest Event name (a DNS-1123 subdomain).
pub(super) const MAX_NAME: usize = 253;
/// Longest `reportingInstance` the API server accepts (`ReportingInstanceLengthLimit`).
pub(super) const MAX_INSTANCE: usize = 128;

/// What makes two Events the same one, whose repeat bumps the first's `series.count`: as
/// kube-rs keys its cache (the note is left out, so a repeat keeps the first message).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    type_: &'static str,
    reason: String,
    action: String,
    regarding: RefKey,
    related: Option<RefKey>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RefKey {
    api_version: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

impl From<&ObjectReference> for RefKey {
    fn from(r: &ObjectReference) -> Self {
        Self {
            api_version: r.api_version.clone(),
            kind: r.kind.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        }
    }
}

struct Cached {
    event: K8sEvent,
    last_seen: Instant,
}

/// Creates Events and patches their repeats.
pub(super) struct Recorder {
    client: kube::Client,
    controller: String,
    instance: String,
    /// How long a published Event is patched rather than created anew.
    ttl: Duration,
    cache: Mutex<HashMap<Key, Cached>>,
}

impl Recorder {
    /// A recorder reporting as `controller` on `instance` (the controller's name when unset).
    /// An Event recurring within `ttl` of its last publication is patched.
    pub(super) fn new(
        client: kube::Client,
        controller: &str,
        instance: Option<&str>,
        ttl: Duration,
    ) -> Self {
        let instance = instance.filter(|i| !i.is_empty()).unwrap_or(controller);
        Self {
            client,
            controller: controller.to_owned(),
            instance: bounded(instance, MAX_INSTANCE),
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes `ev` on `regarding`: a PATCH of the same Event's series when it was published
    /// within the TTL, otherwise a new Event.
    pub(super) async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Instant::now();
        let key = Key {
            type_: type_name(ev.type_),
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            regarding: regarding.into(),
            related: ev.secondary.as_ref().map(Into::into),
        };
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let repeat = {
            let mut cache = self.cache.lock().await;
            let ttl = self.ttl;
            cache.retain(|_, c| now.saturating_duration_since(c.last_seen) < ttl);
            cache.get(&key).map(|c| c.event.clone())
        };
        let stamp = Timestamp::now();
        if let Some(mut event) = repeat {
            let count = event
                .series
                .as_ref()
                .map_or(2, |s| s.count.saturating_add(1));
            event.series = Some(EventSeries {
                count,
                last_observed_time: MicroTime(stamp),
            });
            let name = event.metadata.name.clone().unwrap_or_default();
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&event))
                .await
            {
                Ok(_) => {
                    self.remember(key, event, now).await;
                    return Ok(());
                }
                // Gone (the API server's event TTL, or deleted): start a new Event.
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    self.cache.lock().await.remove(&key);
                }
                Err(e) => return Err(e),
            }
        }
        let event = self.new_event(ev, regarding, stamp);
        api.create(&PostParams::default(), &event).await?;
        self.remember(key, event, now).await;
        Ok(())
    }

    async fn remember(&self, key: Key, event: K8sEvent, now: Instant) {
        self.cache.lock().await.insert(
            key,
            Cached {
                event,
                last_seen: now,
            },
        );
    }

    fn new_event(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let object = regarding.name.as_deref().unwrap_or(&self.controller);
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            note: ev.note.clone(),
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(event_name(object, now.as_nanosecond())),
                ..ObjectMeta::default()
            },
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(type_name(ev.type_).to_owned()),
            ..K8sEvent::default()
        }
    }
}

fn type_name(t: EventType) -> &'static str {
    match t {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

/// The name of an Event about `object` created at `nanos`: `<object>.<nanos in hex>` as kube-rs
/// and client-go name them, when that is a valid name. Otherwise (a name over 236 characters,
/// or one that is not a DNS-1123 subdomain) the longest prefix that fits, made of `[a-z0-9-]`,
/// then `-` and a hash of the whole name, so that two long names sharing a prefix still tell
/// their Events apart.
pub(super) fn event_name(object: &str, nanos: i128) -> String {
    let suffix = format!("{:x}", nanos.max(0));
    let room = MAX_NAME.saturating_sub(suffix.len() + 1);
    let plain =
        object.len() <= room && crate::inventory::validate::is_dns1123_subdomain(object).is_empty();
    if plain {
        return format!("{object}.{suffix}");
    }
    let hash = format!("{:016x}", fnv1a(object.as_bytes()));
    let keep = room.saturating_sub(hash.len() + 1);
    let mut prefix: String = object
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(keep)
        .collect();
    while prefix.ends_with('-') {
        prefix.pop();
    }
    let prefix = prefix.trim_start_matches('-');
    if prefix.is_empty() {
        format!("{hash}.{suffix}")
    } else {
        format!("{prefix}-{hash}.{suffix}")
    }
}

/// `s` if it has at most `max` bytes, else its longest prefix that leaves room for `-` and a
/// 16-digit hash of the whole of `s` (distinct long node names stay distinct).
fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let hash = format!("{:016x}", fnv1a(s.as_bytes()));
    let mut cut = max.saturating_sub(hash.len() + 1);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{hash}", &s[..cut])
}

/// FNV-1a, 64 bits: stable across runs and builds, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::validate::is_dns1123_subdomain;

    const NANOS: i128 = 1_767_225_600_123_456_789;

    #[test]
    fn short_names_are_named_as_kube_names_them() {
        assert_eq!(event_name("db-0", NANOS), format!("db-0.{NANOS:x}"));
        let max = "a".repeat(MAX_NAME - 17);
        assert_eq!(event_name(&max, NANOS), format!("{max}.{NANOS:x}"));
    }

    #[test]
    fn long_or_odd_names_still_make_valid_distinct_names() {
        let long_a = format!("{}a", "x".repeat(252));
        let long_b = format!("{}b", "x".repeat(252));
        let dots = format!("{}.-.x", "y".repeat(240));
        let a237 = "a".repeat(237);
        for object in [long_a.as_str(), &long_b, &dots, "Upper_Case", "-", &a237] {
            let name = event_name(object, NANOS);
            assert!(name.len() <= MAX_NAME, "{} {name}", name.len());
            assert!(is_dns1123_subdomain(&name).is_empty(), "{name}");
        }
        assert_ne!(event_name(&long_a, NANOS), event_name(&long_b, NANOS));
        assert_eq!(event_name(&long_a, NANOS).len(), MAX_NAME);
    }

    #[test]
    fn long_instances_are_bounded_and_stay_distinct() {
        assert_eq!(bounded("node-a", MAX_INSTANCE), "node-a");
        let a = bounded(&format!("{}a", "n".repeat(252)), MAX_INSTANCE);
        let b = bounded(&format!("{}b", "n".repeat(252)), MAX_INSTANCE);
        assert_eq!(a.len(), MAX_INSTANCE);
        assert_ne!(a, b);
        assert!(bounded(&"é".repeat(100), MAX_INSTANCE).len() <= MAX_INSTANCE);
    }
}
