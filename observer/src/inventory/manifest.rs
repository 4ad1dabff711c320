//! Inventory from a directory of Kubernetes manifests.
//!
//! The directory is read recursively, in sorted order, taking `*.yaml`, `*.yml` and `*.json`
//! files. A file may hold several YAML documents, a stream of JSON objects, or `kind: List` (and
//! typed lists like `PodList`), which is what `kubectl get ns,pods,networkpolicies -A -o yaml`
//! writes. Namespaces, Pods and `networking.k8s.io/v1` NetworkPolicies make up the inventory;
//! ReplicaSets and Jobs only teach the [`OwnerIndex`] who owns them; anything else is skipped.
//!
//! Entries whose name starts with `.` are skipped. Besides editor droppings, this matters for
//! ConfigMap volumes: they hold the files twice, once through the visible symlinks and once in
//! the hidden `..data`/`..<timestamp>` directories the kubelet swaps atomically.
//!
//! Defaults follow `kubectl apply`: an object without a namespace is in `default`. A namespace
//! that pods or policies refer to but that is not in the manifests is created with only its
//! `kubernetes.io/metadata.name` label, so namespace selectors still match it by name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use serde_json::Value;

use super::convert::{self, ConvertError};
use super::model::Inventory;
use super::validate::{self, InvalidObject, PodLayout};
use super::workload::OwnerIndex;

/// Namespace of objects that do not name one, as with `kubectl apply`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// File name extensions read from the directory.
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Why the manifest directory could not be loaded. Every variant names the file, and where an
/// object is at fault, the object.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid YAML or JSON.
    #[error("{}: {what}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Which part of the file (`document 3`).
        what: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// An object is malformed (missing kind, wrong field types, bad IP, ...).
    #[error("{}: {object}: {message}", path.display())]
    Object {
        /// The file.
        path: PathBuf,
        /// The object: position in the file, and kind/namespace/name when known.
        object: Box<ObjectLocation>,
        /// What is wrong with it.
        message: String,
    },
    /// The same object appears twice.
    #[error("{}: {object}: duplicate of the object at {} {first_object}", path.display(), first_path.display())]
    Duplicate {
        /// The file with the second copy.
        path: PathBuf,
        /// The second copy.
        object: Box<ObjectLocation>,
        /// The file with the first copy.
        first_path: PathBuf,
        /// The first copy.
        first_object: Box<ObjectLocation>,
    },
}

impl LoadError {
    /// The file at fault.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::Syntax { path, .. }
            | Self::Object { path, .. }
            | Self::Duplicate { path, .. } => path,
        }
    }
}

/// Where an object sits in a file, and what it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectLocation {
    /// 1-based document (YAML document or JSON value) in the file.
    pub document: usize,
    /// 0-based index in a `List`'s `items`, when inside one.
    pub item: Option<usize>,
    /// `kind`, when present.
    pub kind: Option<String>,
    /// `metadata.namespace`, when present.
    pub namespace: Option<String>,
    /// `metadata.name`, when present.
    pub name: Option<String>,
}

impl fmt::Display for ObjectLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        match (&self.kind, &self.namespace, &self.name) {
            (None, None, None) => Ok(()),
            (kind, ns, name) => {
                write!(f, " ({}", kind.as_deref().unwrap_or("<no kind>"))?;
                match (ns, name) {
                    (Some(ns), Some(name)) => write!(f, " {ns}/{name}")?,
                    (None, Some(name)) => write!(f, " {name}")?,
                    (Some(ns), None) => write!(f, " {ns}/<no name>")?,
                    (None, None) => {}
                }
                f.write_str(")")
            }
        }
    }
}

/// What a load found besides the inventory, for logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadSummary {
    /// Files read.
    pub files: usize,
    /// ReplicaSets and Jobs used for workload resolution.
    pub owners: usize,
    /// Objects of other kinds, skipped, by `apiVersion/kind`.
    pub ignored: BTreeMap<String, usize>,
    /// Namespaces created because something referred to them.
    pub implied_namespaces: usize,
}

/// Loads every manifest under `path` into an [`Inventory`].
pub fn load_dir(path: &Path) -> Result<Inventory, LoadError> {
    load_dir_with_summary(path).map(|(inv, _)| inv)
}

/// Like [`load_dir`], also returning what was skipped or implied.
pub fn load_dir_with_summary(path: &Path) -> Result<(Inventory, LoadSummary), LoadError> {
    let files = manifest_files(path)?;
    let mut loader = Loader::default();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| LoadError::Io {
            path: file.clone(),
            source,
        })?;
        loader.add_file(file, &text)?;
    }
    loader.summary.files = files.len();
    let out = loader.finish()?;
    tracing::debug!(
        dir = %path.display(),
        files = out.1.files,
        owners = out.1.owners,
        ignored = ?out.1.ignored,
        implied_namespaces = out.1.implied_namespaces,
        "loaded manifest directory"
    );
    Ok(out)
}

/// Parses manifests from text, as if read from a file named `path` (used by tests and tools).
pub fn load_str(path: &Path, text: &str) -> Result<Inventory, LoadError> {
    let mut loader = Loader::default();
    loader.add_file(path, text)?;
    loader.finish().map(|(inv, _)| inv)
}

/// The manifest files under `dir`, sorted, following symlinks, skipping hidden entries.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut out = Vec::new();
    let mut seen_dirs = HashSet::new();
    walk(dir, &mut out, &mut seen_dirs)?;
    out.sort();
    Ok(out)
}

fn walk(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    seen_dirs: &mut HashSet<PathBuf>,
) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_owned(),
        source,
    };
    // A symlink cycle would otherwise recurse forever.
    if !seen_dirs.insert(std::fs::canonicalize(dir).map_err(io)?) {
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            // A dangling symlink is a swap in progress or a stale link, not a manifest.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(LoadError::Io { path, source }),
        };
        if meta.is_dir() {
            walk(&path, out, seen_dirs)?;
        } else if meta.is_file() && has_manifest_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn has_manifest_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// An object found in a file, with where it came from.
struct Found<T> {
    path: Arc<Path>,
    at: ObjectLocation,
    obj: T,
}

#[derive(Default)]
struct Loader {
    namespaces: Vec<Found<core::Namespace>>,
    pods: Vec<Found<core::Pod>>,
    policies: Vec<Found<NetworkPolicy>>,
    owners: OwnerIndex,
    /// Objects of a used kind that the API server would refuse: left out, reported.
    invalid: Vec<InvalidObject>,
    /// (kind, namespace, name) → first place seen, to reject duplicates.
    seen: HashMap<(String, String, String), (Arc<Path>, ObjectLocation)>,
    summary: LoadSummary,
}

fn is_json(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

impl Loader {
    fn add_file(&mut self, path: &Path, text: &str) -> Result<(), LoadError> {
        let path: Arc<Path> = Arc::from(path);
        let syntax = |document: usize, message: String| LoadError::Syntax {
            path: path.to_path_buf(),
            what: format!("document {document}"),
            message,
        };
        if is_json(&path) {
            let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
            for (i, doc) in stream.enumerate() {
                let doc = doc.map_err(|e| syntax(i + 1, e.to_string()))?;
                self.add_document(&path, i + 1, doc)?;
            }
        } else {
            for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
                let doc = Value::deserialize(doc).map_err(|e| syntax(i + 1, e.to_string()))?;
                self.add_document(&path, i + 1, doc)?;
            }
        }
        Ok(())
    }

    fn add_document(
        &mut self,
        path: &Arc<Path>,
        document: usize,
        doc: Value,
    ) -> Result<(), LoadError> {
        let at = ObjectLocation {
            document,
            ..ObjectLocation::default()
        };
        match doc {
            // An empty document (`---` at the end, comments only).
            Value::Null => Ok(()),
            Value::Object(_) if is_list(&doc) => {
                let at = locate(&doc, at);
                let Value::Object(mut map) = doc else {
                    return Ok(());
                };
                let items = match map.remove("items") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(items)) => items,
                    Some(_) => {
                        return Err(object_error(path, at, "`items` is not a list".into()));
                    }
                };
                for (i, item) in items.into_iter().enumerate() {
                    let at = ObjectLocation {
                        document,
                        item: Some(i),
                        ..ObjectLocation::default()
                    };
                    if is_list(&item) {
                        return Err(object_error(
                            path,
                            locate(&item, at),
                            "a List inside a List".into(),
                        ));
                    }
                    self.add_object(path, at, item)?;
                }
                Ok(())
            }
            doc => self.add_object(path, at, doc),
        }
    }

    fn add_object(
        &mut self,
        path: &Arc<Path>,
        at: ObjectLocation,
        obj: Value,
    ) -> Result<(), LoadError> {
        let mut at = locate(&obj, at);
        if !obj.is_object() {
            return Err(object_error(
                path,
                at,
                "not an object (a mapping with kind, apiVersion, metadata)".into(),
            ));
        }
        let Some(kind) = at.kind.clone() else {
            return Err(object_error(path, at, "no `kind`".into()));
        };
        let api_version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let known = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => Some(true),
            ("v1", "Pod")
            | ("networking.k8s.io/v1", "NetworkPolicy")
            | ("apps/v1", "ReplicaSet")
            | ("batch/v1", "Job") => Some(false),
            _ => None,
        };
        let Some(cluster_scoped) = known else {
            let key = format!("{api_version}/{kind}");
            tracing::debug!(file = %path.display(), object = %at, kind = %key, "skipping object of a kind the inventory does not use");
            *self.summary.ignored.entry(key).or_default() += 1;
            return Ok(());
        };
        if !cluster_scoped && at.namespace.is_none() {
            at.namespace = Some(DEFAULT_NAMESPACE.to_owned());
        }
        if let Some(name) = &at.name {
            let key_ns = match cluster_scoped {
                true => String::new(),
                false => at.namespace.clone().unwrap_or_default(),
            };
            let key = (kind.clone(), key_ns, name.clone());
            if let Some((first_path, first_object)) = self.seen.get(&key) {
                return Err(LoadError::Duplicate {
                    path: path.to_path_buf(),
                    object: Box::new(at),
                    first_path: first_path.to_path_buf(),
                    first_object: Box::new(first_object.clone()),
                });
            }
            self.seen.insert(key, (path.clone(), at.clone()));
        }
        // An object of a used kind that does not even deserialize as that kind is one the API
        // server would refuse too: it is left out like any invalid object, and the rest loads.
        match kind.as_str() {
            "Namespace" => {
                if let Some(obj) = self.typed::<core::Namespace>(path, &at, obj) {
                    self.namespaces.push(Found {
                        path: path.clone(),
                        at,
                        obj,
                    });
                }
            }
            "Pod" => {
                if let Some(mut obj) = self.typed::<core::Pod>(path, &at, obj) {
                    obj.metadata.namespace = at.namespace.clone();
                    self.pods.push(Found {
                        path: path.clone(),
                        at,
                        obj,
                    });
                }
            }
            "NetworkPolicy" => {
                if let Some(mut obj) = self.typed::<NetworkPolicy>(path, &at, obj) {
                    obj.metadata.namespace = at.namespace.clone();
                    self.policies.push(Found {
                        path: path.clone(),
                        at,
                        obj,
                    });
                }
            }
            "ReplicaSet" => {
                if let Some(mut obj) = self.typed::<ReplicaSet>(path, &at, obj)
                    && self.has_name(path, &at)
                {
                    obj.metadata.namespace = at.namespace.clone();
                    self.owners.insert_replicaset(&obj);
                    self.summary.owners += 1;
                }
            }
            _ => {
                if let Some(mut obj) = self.typed::<Job>(path, &at, obj)
                    && self.has_name(path, &at)
                {
                    obj.metadata.namespace = at.namespace.clone();
                    self.owners.insert_job(&obj);
                    self.summary.owners += 1;
                }
            }
        }
        Ok(())
    }

    /// Deserializes `obj` as `T`, or records it as invalid.
    fn typed<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &Path,
        at: &ObjectLocation,
        obj: Value,
    ) -> Option<T> {
        match serde_json::from_value(obj) {
            Ok(t) => Some(t),
            Err(e) => {
                self.invalid.push(invalid_object(
                    path,
                    at,
                    vec![format!("cannot be read: {e}")],
                ));
                None
            }
        }
    }

    fn has_name(&mut self, path: &Path, at: &ObjectLocation) -> bool {
        if at.name.is_none() {
            self.invalid.push(invalid_object(
                path,
                at,
                vec!["metadata.name: Required value: name or generateName is required".into()],
            ));
        }
        at.name.is_some()
    }

    /// Converts everything, now that all owners are known (a Pod may come before its
    /// ReplicaSet).
    fn finish(self) -> Result<(Inventory, LoadSummary), LoadError> {
        let Loader {
            namespaces,
            pods,
            policies,
            owners,
            mut invalid,
            mut summary,
            ..
        } = self;
        // Validation comes first so that an object is reported with every field at fault;
        // a conversion error after it would be a gap in validation, reported the same way.
        fn check<T>(
            f: &Found<T>,
            errors: Vec<validate::FieldError>,
            invalid: &mut Vec<InvalidObject>,
        ) -> bool {
            if errors.is_empty() {
                return true;
            }
            let errors = errors.iter().map(ToString::to_string).collect();
            invalid.push(invalid_object(&f.path, &f.at, errors));
            false
        }
        fn conv<T>(f: &Found<T>, e: &ConvertError) -> InvalidObject {
            invalid_object(&f.path, &f.at, vec![e.to_string()])
        }
        let mut inv = Inventory::default();
        for f in &namespaces {
            if !check(f, validate::namespace(&f.obj), &mut invalid) {
                continue;
            }
            match convert::namespace(&f.obj) {
                Ok(ns) => {
                    inv.namespaces.insert(ns.name.clone(), ns);
                }
                Err(e) => invalid.push(conv(f, &e)),
            }
        }
        for f in &pods {
            if !check(f, validate::pod(&f.obj, PodLayout::AsWritten), &mut invalid) {
                continue;
            }
            match convert::pod(&f.obj, &owners) {
                Ok(pod) => inv.pods.push(Arc::new(pod)),
                Err(e) => invalid.push(conv(f, &e)),
            }
        }
        for f in policies {
            if !check(&f, validate::network_policy(&f.obj), &mut invalid) {
                continue;
            }
            let (path, at) = (f.path.clone(), f.at.clone());
            match convert::policy(f.obj) {
                Ok(policy) => inv.policies.push(policy),
                Err(e) => invalid.push(invalid_object(&path, &at, vec![e.to_string()])),
            }
        }
        for o in &invalid {
            tracing::warn!(
                object = %o,
                "left out of the inventory: the API server would refuse this object"
            );
        }
        invalid.sort_by(|a, b| {
            (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name))
        });
        inv.invalid = invalid;
        let referenced: Vec<String> = inv
            .pods
            .iter()
            .map(|p| p.namespace.clone())
            .chain(
                inv.policies
                    .iter()
                    .filter_map(|p| p.metadata.namespace.clone()),
            )
            .collect();
        for ns in referenced {
            if !inv.namespaces.contains_key(&ns) {
                summary.implied_namespaces += 1;
                inv.namespaces
                    .insert(ns.clone(), convert::namespace_from_name(&ns));
            }
        }
        Ok((inv, summary))
    }
}

fn is_list(v: &Value) -> bool {
    v.get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k == "List" || (k.ends_with("List") && v.get("items").is_some()))
}

/// Fills in kind, namespace and name from the raw object, for error messages.
fn locate(obj: &Value, mut at: ObjectLocation) -> ObjectLocation {
    let text = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    at.kind = text(obj.get("kind"));
    let meta = obj.get("metadata");
    at.namespace = text(meta.and_then(|m| m.get("namespace")));
    at.name = text(meta.and_then(|m| m.get("name")));
    at
}

fn object_error(path: &Path, object: ObjectLocation, message: String) -> LoadError {
    LoadError::Object {
        path: path.to_path_buf(),
        object: Box::new(object),
        message,
    }
}

/// An invalid object found at `at` in `path`.
fn invalid_object(path: &Path, at: &ObjectLocation, errors: Vec<String>) -> InvalidObject {
    let mut source = format!("{}: document {}", path.display(), at.document);
    if let Some(item) = at.item {
        source.push_str(&format!(" item {item}"));
    }
    InvalidObject {
        kind: at.kind.clone().unwrap_or_default(),
        namespace: at.namespace.clone(),
        name: at.name.clone(),
        source: Some(source),
        errors,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::inventory::model::{PodPhase, Workload};

    fn load(text: &str) -> Result<Inventory, LoadError> {
        load_str(Path::new("t.yaml"), text)
    }

    #[test]
    fn multi_document_yaml() {
        let inv = load(
            r#"
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
# comment-only document
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: prod
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: "1", controller: true}]
status: {phase: Running, podIP: 10.0.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: loose}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: prod}
spec: {podSelector: {}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c, namespace: prod}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: calico, namespace: prod}
"#,
        )
        .unwrap();
        assert_eq!(inv.pods.len(), 2);
        assert_eq!(inv.policies.len(), 1, "only networking.k8s.io/v1 policies");
        let db = &inv.pods[0];
        assert_eq!(
            db.workload,
            Workload {
                kind: "StatefulSet".into(),
                name: "db".into()
            }
        );
        assert_eq!(db.ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(db.phase, PodPhase::Running);
        assert_eq!(inv.pods[1].namespace, "default");
        // prod from the file (keeps its labels), default implied with only the name label.
        assert_eq!(inv.namespaces.len(), 2);
        assert_eq!(inv.namespaces["prod"].labels.get("env").unwrap(), "prod");
        assert_eq!(
            inv.namespaces["prod"]
                .labels
                .get("kubernetes.io/metadata.name")
                .unwrap(),
            "prod"
        );
        assert_eq!(inv.namespaces["default"].labels.len(), 1);
    }

    #[test]
    fn json_stream_and_list() {
        let text = r#"
{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "x"}},
  {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b", "namespace": "x"}}
]}
{"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
  {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "c", "namespace": "y"}}
]}
"#;
        let inv = load_str(Path::new("x.json"), text).unwrap();
        let names: Vec<_> = inv.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(inv.namespaces.keys().collect::<Vec<_>>(), ["x", "y"]);
    }

    #[test]
    fn owners_from_replicasets_and_jobs_even_after_the_pod() {
        let inv = load(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: p
  namespace: n
  labels: {pod-template-hash: abc12}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: r-abc12, uid: "1", controller: true}]
---
apiVersion: v1
kind: Pod
metadata:
  name: q
  namespace: n
  ownerReferences: [{apiVersion: batch/v1, kind: Job, name: once, uid: "2", controller: true}]
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: r-abc12
  namespace: n
  ownerReferences: [{apiVersion: argoproj.io/v1alpha1, kind: Rollout, name: r, uid: "3", controller: true}]
---
apiVersion: batch/v1
kind: Job
metadata:
  name: once
  namespace: n
  ownerReferences: [{apiVersion: batch/v1, kind: CronJob, name: hourly, uid: "4", controller: true}]
"#,
        )
        .unwrap();
        assert_eq!(
            inv.pods[0].workload,
            Workload {
                kind: "Rollout".into(),
                name: "r".into()
            }
        );
        assert_eq!(
            inv.pods[1].workload,
            Workload {
                kind: "CronJob".into(),
                name: "hourly".into()
            }
        );
    }

    #[test]
    fn errors_name_file_and_object() {
        let e = load("---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\nmetadata: {name: x}\n").unwrap_err();
        assert_eq!(e.to_string(), "t.yaml: document 2 (<no kind> x): no `kind`");

        let e = load("a: [unclosed\n").unwrap_err();
        assert!(matches!(e, LoadError::Syntax { .. }), "{e}");
        assert!(e.to_string().starts_with("t.yaml: document 1: "), "{e}");

        let e = load("- 1\n- 2\n").unwrap_err();
        assert!(e.to_string().contains("not an object"), "{e}");

        let e = load("apiVersion: v1\nkind: List\nitems: 3\n").unwrap_err();
        assert!(e.to_string().contains("`items` is not a list"), "{e}");
    }

    /// An object the API server would refuse is left out with a message naming file, object
    /// and field; everything else loads.
    #[test]
    fn invalid_objects_are_left_out_and_reported() {
        let inv = load(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: n}
spec: {containers: 3}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Pod, metadata: {name: ok, namespace: n}, status: {podIP: 10.0.0.1}}
- {apiVersion: v1, kind: Pod, metadata: {name: b, namespace: n}, status: {podIP: nope}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: n}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: typo, namespace: n}
spec: {podSelector: {}, policyTypes: [Ingres]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: good, namespace: n}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: v1
kind: Namespace
metadata: {name: Bad}
---
apiVersion: apps/v1
kind: ReplicaSet
metadata: {namespace: n}
"#,
        )
        .unwrap();
        assert_eq!(inv.pods.len(), 1);
        assert_eq!(inv.pods[0].name, "ok");
        assert_eq!(inv.policies.len(), 1);
        assert_eq!(inv.policies[0].metadata.name.as_deref(), Some("good"));
        assert_eq!(inv.namespaces.keys().collect::<Vec<_>>(), ["n"]);
        let got: Vec<String> = inv.invalid.iter().map(ToString::to_string).collect();
        assert_eq!(got.len(), 6, "{got:#?}");
        assert_eq!(
            got[0],
            "t.yaml: document 6: Namespace Bad: metadata.name: Invalid value: \"Bad\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        );
        assert_eq!(
            got[1],
            "t.yaml: document 3: NetworkPolicy n/<no name>: metadata.name: Required value: name or generateName is required"
        );
        assert_eq!(
            got[2],
            "t.yaml: document 4: NetworkPolicy n/typo: spec.policyTypes[0]: Unsupported value: \"Ingres\": supported values: \"Ingress\", \"Egress\""
        );
        assert!(
            got[3].starts_with("t.yaml: document 1: Pod n/a: cannot be read: invalid type"),
            "{}",
            got[3]
        );
        assert_eq!(
            got[4],
            "t.yaml: document 2 item 1: Pod n/b: status.podIP: Invalid value: \"nope\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
        );
        assert_eq!(
            got[5],
            "t.yaml: document 7: ReplicaSet n/<no name>: metadata.name: Required value: name or generateName is required"
        );
        let counts = inv.invalid_counts();
        assert_eq!(counts["networkpolicies"], 2);
        assert_eq!(counts["pods"], 2);
        assert_eq!(counts["namespaces"], 1);
        assert_eq!(counts["replicasets"], 1);
    }

    #[test]
    fn duplicates_are_rejected() {
        let e = load("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: default}\n")
            .unwrap_err();
        assert!(matches!(e, LoadError::Duplicate { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "t.yaml: document 2 (Pod default/a): duplicate of the object at t.yaml document 1 (Pod default/a)"
        );
    }
}
