//! Inventory from a directory of Kubernetes manifests.
//!
//! The directory is read recursively, in sorted order, taking `*.yaml`, `*.yml` and `*.json`
//! files. A file may hold several YAML documents, a stream of JSON objects, or `kind: List` (and
//! typed lists like `PodList`), which is what `kubectl get ns,pods,networkpolicies -A -o yaml`
//! writes. Namespaces, Pods and `networking.k8s.io/v1` NetworkPolicies make up the inventory,
//! and Services contribute their ClusterIPs; ReplicaSets and Jobs only teach the
//! [`OwnerIndex`] who owns them; anything else is skipped.
//!
//! Entries whose name starts with `.` are skipped. Besides editor droppings, this matters for
//! ConfigMap volumes: they hold the files twice, once through the visible symlinks and once in
//! the hidden `..data`/`..<timestamp>` directories the kubelet swaps atomically.
//!
//! Defaults follow `kubectl apply`: an object without a namespace is in `default`. A namespace
//! that pods or policies refer to but that is not in the manifests is created with only its
//! `kubernetes.io/metadata.name` label, so namespace selectors still match it by name.
//!
//! A YAML file is parsed as it is read, and a List's items are prepared one at a time (see
//! `yaml`): neither the text nor the parse of a whole `kubectl get -A -o yaml` dump is ever
//! held, only the reduced objects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde::Deserializer;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::map::Entry;

use super::convert::{self, ConvertError};
use super::kube;
use super::model::Inventory;
use super::model::{Pod, Service};
use super::validate::{self, InvalidObject, PodLayout};
use super::workload::{self, OwnerIndex};

mod yaml;

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
    /// Namespaces created because something referred to them (no Namespace object), by name.
    pub implied_namespaces: Vec<String>,
    /// Pods without `spec.containers` (`ns/name`, sorted). The API server requires at least
    /// one container, so in a hand-written inventory this is likely an omission: such pods
    /// are kept (their labels and IPs are what matters most), but they have no container
    /// ports, so a policy's named port never matches them.
    pub pods_without_containers: Vec<String>,
}

impl LoadSummary {
    /// Warnings worth showing to whoever wrote the manifests (empty when there is none).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.pods_without_containers.is_empty() {
            let n = self.pods_without_containers.len();
            let mut shown: Vec<&str> = self
                .pods_without_containers
                .iter()
                .take(5)
                .map(String::as_str)
                .collect();
            if n > shown.len() {
                shown.push("...");
            }
            out.push(format!(
                "{n} pod(s) without spec.containers, which the API server requires: kept, but \
                 with no container ports a policy's named port never matches them: {}",
                shown.join(", ")
            ));
        }
        out
    }
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
        let io = |source| LoadError::Io {
            path: file.clone(),
            source,
        };
        // Parsed as it is read: the text of a large dump is never held whole.
        let reader = std::io::BufReader::new(std::fs::File::open(file).map_err(io)?);
        if is_json(file) {
            loader.add_json(file, reader)?;
        } else {
            loader.add_yaml(file, yaml::from_reader(reader))?;
        }
    }
    loader.summary.files = files.len();
    let out = loader.finish()?;
    // Label sets of the inventory before the last one are garbage by now (a reload's caller
    // holds at most the current one while this one is built).
    super::labels::prune();
    tracing::debug!(
        dir = %path.display(),
        files = out.1.files,
        owners = out.1.owners,
        ignored = ?out.1.ignored,
        implied_namespaces = out.1.implied_namespaces.len(),
        "loaded manifest directory"
    );
    Ok(out)
}

/// Parses manifests from text, as if read from a file named `path` (used by tests and tools).
pub fn load_str(path: &Path, text: &str) -> Result<Inventory, LoadError> {
    load_str_with_summary(path, text).map(|(inv, _)| inv)
}

/// Like [`load_str`], also returning what was skipped or implied.
pub fn load_str_with_summary(
    path: &Path,
    text: &str,
) -> Result<(Inventory, LoadSummary), LoadError> {
    let mut loader = Loader::default();
    if is_json(path) {
        loader.add_json(path, text.as_bytes())?;
    } else {
        loader.add_yaml(path, yaml::from_str(text))?;
    }
    loader.finish()
}

/// The manifest files under `dir`, sorted, following symlinks, skipping hidden entries.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut out = Vec::new();
    let mut seen_dirs = HashSet::new();
    walk(dir, &mut out, &mut seen_dirs, 0)?;
    out.sort();
    Ok(out)
}

/// Directory levels [`manifest_files`] descends: far more than any manifest tree has, and few
/// enough that a hostile tree of thousands of nested directories is refused at once.
const MAX_DIR_DEPTH: usize = 64;

fn walk(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    seen_dirs: &mut HashSet<(u64, u64)>,
    depth: usize,
) -> Result<(), LoadError> {
    use std::os::unix::fs::MetadataExt;
    let io = |source| LoadError::Io {
        path: dir.to_owned(),
        source,
    };
    // A symlink cycle would otherwise recurse forever. The directory's identity is its
    // device and inode: one stat, where resolving the whole path at every level made a deep
    // tree cost the square of its depth.
    let meta = std::fs::metadata(dir).map_err(io)?;
    if !seen_dirs.insert((meta.dev(), meta.ino())) {
        return Ok(());
    }
    if depth > MAX_DIR_DEPTH {
        return Err(io(std::io::Error::other(format!(
            "directories nested more than {MAX_DIR_DEPTH} levels deep"
        ))));
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
            walk(&path, out, seen_dirs, depth + 1)?;
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
    /// Converted as they are read, so that no API object of a 10,000-pod dump outlives its
    /// item; the workload is resolved again once every owner is known.
    pods: Vec<Found<PreparedPod>>,
    policies: Vec<Found<NetworkPolicy>>,
    services: Vec<Service>,
    owners: OwnerIndex,
    /// Objects of a used kind that the API server would refuse: left out, reported.
    invalid: Vec<InvalidObject>,
    /// (kind, namespace, name) → first place seen, to reject duplicates.
    seen: HashMap<(String, String, String), (Arc<Path>, ObjectLocation)>,
    summary: LoadSummary,
    /// Nodes YAML aliases copied so far in this load ([`yaml::MAX_ALIASED_NODES_PER_LOAD`]).
    yaml_aliased: usize,
}

/// A JSON file's bytes for serde_json, checked as UTF-8 a line at a time (a file that is not
/// UTF-8 is an I/O error, as from `read_to_string`), with the position of the next byte.
struct JsonInput<R> {
    reader: R,
    text: String,
    pos: usize,
    /// 1-based line of the next byte.
    line: usize,
    /// Bytes before the next one on its line.
    column: usize,
}

impl<R: BufRead> JsonInput<R> {
    fn new(reader: R) -> Self {
        Self {
            reader,
            text: String::new(),
            pos: 0,
            line: 1,
            column: 0,
        }
    }

    /// The unread part of the current line, reading the next line when it is used up; empty
    /// at the end of the input.
    fn rest(&mut self) -> std::io::Result<&[u8]> {
        if self.pos >= self.text.len() {
            self.text.clear();
            self.pos = 0;
            self.reader.read_line(&mut self.text)?;
        }
        Ok(self.text.as_bytes().get(self.pos..).unwrap_or_default())
    }

    fn consume(&mut self, n: usize) {
        let used = self.text.as_bytes().get(self.pos..self.pos + n);
        for &b in used.unwrap_or_default() {
            if b == b'\n' {
                self.line += 1;
                self.column = 0;
            } else {
                self.column += 1;
            }
        }
        self.pos += n;
    }

    /// Skips the whitespace between documents; false at the end of the input.
    fn skip_whitespace(&mut self) -> std::io::Result<bool> {
        loop {
            let rest = self.rest()?;
            let Some(&b) = rest.first() else {
                return Ok(false);
            };
            if !matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
                return Ok(true);
            }
            self.consume(1);
        }
    }
}

impl<R: BufRead> Read for JsonInput<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = self.rest()?;
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.consume(n);
        Ok(n)
    }
}

fn is_json(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// A converted pod, and its owner when a ReplicaSet or Job of the manifests may name the
/// workload.
struct PreparedPod {
    model: Pod,
    owner: Option<OwnerReference>,
    /// No `spec.containers` (or no `spec`): kept, reported in [`LoadSummary`].
    no_containers: bool,
}

/// An object read from a file and reduced to what the inventory keeps; [`Loader::commit`]
/// files it. Preparing needs no loader state, so a List's items can be prepared one at a time
/// while the document is still being parsed.
struct Prepared {
    at: ObjectLocation,
    what: Kind,
}

enum Kind {
    /// A kind the inventory does not use, by `apiVersion/kind`.
    Ignored(String),
    /// A used kind that the API server would refuse.
    Invalid(Vec<String>),
    Namespace(Box<core::Namespace>),
    Pod(Box<PreparedPod>),
    Policy(Box<NetworkPolicy>),
    Service(Box<Service>),
    ReplicaSet(Vec<OwnerReference>),
    Job(Vec<OwnerReference>),
}

impl Kind {
    fn is_used(&self) -> bool {
        !matches!(self, Kind::Ignored(_))
    }
}

/// Reads `obj` as the kind it says it is, validates it and trims it.
fn prepare(path: &Path, at: ObjectLocation, obj: Value) -> Result<Prepared, LoadError> {
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
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let known = USED_KINDS.contains(&(kind.as_str(), api_version));
    if !known {
        let what = match misspelt_used_kind(api_version, &kind) {
            Some(error) => Kind::Invalid(vec![error]),
            None => Kind::Ignored(format!("{api_version}/{kind}")),
        };
        return Ok(Prepared { at, what });
    }
    // Namespaces are the one cluster-scoped kind read.
    if kind != "Namespace" && at.namespace.is_none() {
        at.namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }
    // An object of a used kind that does not even deserialize as that kind is one the API
    // server would refuse too: it is left out like any invalid object, and the rest loads.
    fn typed<T: serde::de::DeserializeOwned>(obj: Value) -> Result<T, Kind> {
        serde_json::from_value(obj).map_err(|e| Kind::Invalid(vec![format!("cannot be read: {e}")]))
    }
    fn checked(errors: Vec<validate::FieldError>) -> Result<(), Kind> {
        match errors.is_empty() {
            true => Ok(()),
            false => Err(Kind::Invalid(
                errors.iter().map(ToString::to_string).collect(),
            )),
        }
    }
    let unnamed = || {
        Kind::Invalid(vec![
            "metadata.name: Required value: name or generateName is required".into(),
        ])
    };
    let namespace = at.namespace.clone();
    let what = match kind.as_str() {
        "Namespace" => typed::<core::Namespace>(obj).and_then(|mut ns| {
            checked(validate::namespace(&ns))?;
            kube::trim_namespace(&mut ns);
            Ok(Kind::Namespace(Box::new(ns)))
        }),
        "Pod" => typed::<core::Pod>(obj).and_then(|mut pod| {
            pod.metadata.namespace = namespace;
            checked(validate::pod(&pod, PodLayout::AsWritten))?;
            // Owners seen later can change the workload; which owner is kept for `finish`.
            let model = convert::pod(&pod, &OwnerIndex::default())
                .map_err(|e| Kind::Invalid(vec![e.to_string()]))?;
            let owner = pod
                .metadata
                .owner_references
                .as_deref()
                .and_then(workload::controller_of)
                .filter(|o| matches!(o.kind.as_str(), "ReplicaSet" | "Job"))
                .cloned();
            let no_containers = pod.spec.as_ref().is_none_or(|s| s.containers.is_empty());
            Ok(Kind::Pod(Box::new(PreparedPod {
                model,
                owner,
                no_containers,
            })))
        }),
        "NetworkPolicy" => typed::<NetworkPolicy>(obj).and_then(|mut np| {
            np.metadata.namespace = namespace;
            checked(validate::network_policy(&np))?;
            kube::trim_policy(&mut np);
            Ok(Kind::Policy(Box::new(np)))
        }),
        "Service" => typed::<core::Service>(obj).and_then(|mut svc| {
            svc.metadata.namespace = namespace;
            convert::service(&svc)
                .map(|model| Kind::Service(Box::new(model)))
                .map_err(|e| Kind::Invalid(vec![e.to_string()]))
        }),
        "ReplicaSet" => typed::<ReplicaSet>(obj).and_then(|rs| match at.name {
            Some(_) => Ok(Kind::ReplicaSet(
                rs.metadata.owner_references.unwrap_or_default(),
            )),
            None => Err(unnamed()),
        }),
        _ => typed::<Job>(obj).and_then(|job| match at.name {
            Some(_) => Ok(Kind::Job(job.metadata.owner_references.unwrap_or_default())),
            None => Err(unnamed()),
        }),
    }
    .unwrap_or_else(|invalid| invalid);
    Ok(Prepared { at, what })
}

/// The kinds the inventory reads, with the `apiVersion` each is served under.
const USED_KINDS: [(&str, &str); 6] = [
    ("Namespace", "v1"),
    ("Pod", "v1"),
    ("Service", "v1"),
    ("NetworkPolicy", "networking.k8s.io/v1"),
    ("ReplicaSet", "apps/v1"),
    ("Job", "batch/v1"),
];

/// The API server's error for an object meant as a kind the inventory reads but written with
/// a missing or misspelt `apiVersion` or `kind` (`networking.k8s.io/V1`, `kind:
/// networkpolicy`): the server refuses it, so it must show as invalid rather than vanish as a
/// kind the inventory does not use (a default-deny policy that silently does not exist).
/// `None` for another group's kind of the same name (Calico's `projectcalico.org/v3`
/// NetworkPolicy is not the Kubernetes one) and for kinds the inventory does not read.
fn misspelt_used_kind(api_version: &str, kind: &str) -> Option<String> {
    let &(canonical, expected) = USED_KINDS
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(kind))?;
    let group = |v: &str| {
        v.rsplit_once('/')
            .map_or("", |(g, _)| g)
            .to_ascii_lowercase()
    };
    // Groups the API server itself serves: a kind of ours under one of them that is not its
    // own cannot be a custom resource.
    let built_in = |g: &str| {
        g.is_empty()
            || g.ends_with(".k8s.io")
            || ["apps", "batch", "extensions", "policy", "autoscaling"].contains(&g)
    };
    if api_version.is_empty() {
        return Some(format!(
            "apiVersion: Required value: a {canonical} is `apiVersion: {expected}`"
        ));
    }
    if kind != canonical {
        // Kinds are CamelCase, custom resources' too: another case is a typo.
        return Some(format!(
            "kind: Invalid value: {kind:?}: kinds are case-sensitive ({canonical}, \
             `apiVersion: {expected}`)"
        ));
    }
    let given = group(api_version);
    if given == group(expected) || built_in(&given) {
        return Some(format!(
            "apiVersion: Invalid value: {api_version:?}: a {canonical} is `apiVersion: {expected}`"
        ));
    }
    None
}

/// The `items` of a List document, prepared one by one as the parser reaches them.
enum Items {
    /// `items: null`, or absent.
    None,
    Prepared(Vec<Result<Prepared, LoadError>>),
    /// Not a sequence.
    NotAList,
}

/// Parses one document. A List's items are turned into [`Prepared`] objects while the parser
/// walks them, so no value tree of the whole List (hundreds of MB for a large cluster's
/// `kubectl get -o yaml`) ever exists: one item's at a time.
struct DocumentSeed<'a> {
    path: &'a Path,
    document: usize,
}

/// A parsed document: its top-level fields without `items`, and the items.
enum Document {
    Value(Value),
    Map(serde_json::Map<String, Value>, Items),
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = Document;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Document, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_> {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object or List")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let mut fields = serde_json::Map::new();
        let mut items = Items::None;
        let mut had_items = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                if std::mem::replace(&mut had_items, true) {
                    return Err(serde::de::Error::custom(duplicate_key(&key)));
                }
                items = map.next_value_seed(ItemsSeed {
                    path: self.path,
                    document: self.document,
                })?;
            } else {
                match fields.entry(key) {
                    Entry::Occupied(e) => {
                        return Err(serde::de::Error::custom(duplicate_key(e.key())));
                    }
                    Entry::Vacant(e) => {
                        e.insert(map.next_value_seed(StrictValue)?);
                    }
                }
            }
        }
        Ok(Document::Map(fields, items))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Document, A::Error> {
        StrictValue.visit_seq(seq).map(Document::Value)
    }

    fn visit_unit<E>(self) -> Result<Document, E> {
        Ok(Document::Value(Value::Null))
    }

    fn visit_none<E>(self) -> Result<Document, E> {
        Ok(Document::Value(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Document, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Document, E> {
        Ok(Document::Value(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Document, E> {
        Ok(Document::Value(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Document, E> {
        Ok(Document::Value(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Document, E> {
        Ok(Document::Value(Value::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Document, E> {
        Ok(Document::Value(Value::from(v)))
    }
}

/// The message for a key given twice in one mapping, in YAML and JSON alike: kubectl's strict
/// field validation refuses it, and which of the two a reader takes differs between tools
/// (serde_json and Go's `encoding/json` keep the last), so a reviewer and this tool could read
/// two different specs from the same file.
pub(super) fn duplicate_key(key: &str) -> String {
    format!("duplicate key {key:?} (the API server refuses duplicate fields)")
}

/// A JSON value built as serde_json builds a [`Value`], except that a key given twice in one
/// object is an error (serde_json keeps the last one silently). The check is the insertion
/// itself (one map lookup per key, as before), and the error is raised as the second key is
/// read, so serde_json places it there: `duplicate key "app" ... at line 7 column 12`.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            match out.entry(key) {
                Entry::Occupied(e) => {
                    return Err(serde::de::Error::custom(duplicate_key(e.key())));
                }
                Entry::Vacant(e) => {
                    e.insert(map.next_value_seed(StrictValue)?);
                }
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictValue)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
}

/// Item `index` of the List that is document `document`.
fn prepare_item(
    path: &Path,
    document: usize,
    index: usize,
    item: Value,
) -> Result<Prepared, LoadError> {
    let at = ObjectLocation {
        document,
        item: Some(index),
        ..ObjectLocation::default()
    };
    if is_list(&item) {
        Err(object_error(
            path,
            locate(&item, at),
            "a List inside a List".into(),
        ))
    } else {
        prepare(path, at, item)
    }
}

struct ItemsSeed<'a> {
    path: &'a Path,
    document: usize,
}

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = Items;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Items, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_> {
    type Value = Items;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictValue)? {
            out.push(prepare_item(self.path, self.document, out.len(), item));
        }
        Ok(Items::Prepared(out))
    }

    fn visit_unit<E>(self) -> Result<Items, E> {
        Ok(Items::None)
    }

    fn visit_none<E>(self) -> Result<Items, E> {
        Ok(Items::None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Items, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Items, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Items::NotAList)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Items, E> {
        Ok(Items::NotAList)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Items, E> {
        Ok(Items::NotAList)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Items, E> {
        Ok(Items::NotAList)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Items, E> {
        Ok(Items::NotAList)
    }

    fn visit_str<E>(self, _: &str) -> Result<Items, E> {
        Ok(Items::NotAList)
    }
}

impl Loader {
    /// Reads a stream of YAML documents.
    fn add_yaml<'i, T: granit_parser::BorrowedInput<'i>>(
        &mut self,
        path: &Path,
        parser: granit_parser::Parser<'i, T>,
    ) -> Result<(), LoadError> {
        let shared: Arc<Path> = Arc::from(path);
        // Taken out for the call: the closure borrows the loader.
        let mut aliased = std::mem::take(&mut self.yaml_aliased);
        let result = yaml::documents(parser, path, &mut aliased, |document, doc| {
            self.add_document(&shared, document, doc)
        });
        self.yaml_aliased = aliased;
        result
    }

    /// Reads a stream of JSON values as it is read, one document at a time (a List's items
    /// one at a time, as for YAML).
    fn add_json<R: BufRead>(&mut self, path: &Path, reader: R) -> Result<(), LoadError> {
        let shared: Arc<Path> = Arc::from(path);
        let io = |source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut input = JsonInput::new(reader);
        // A byte-order mark (Windows editors write one) is not JSON, but YAML files may start
        // with one and the API server's clients strip it: so is it here.
        if input.rest().map_err(io)?.starts_with(b"\xEF\xBB\xBF") {
            input.pos += 3;
        }
        let mut document = 0;
        while input.skip_whitespace().map_err(io)? {
            document += 1;
            let (line, column) = (input.line, input.column);
            let seed = DocumentSeed { path, document };
            let doc = seed
                .deserialize(&mut serde_json::Deserializer::from_reader(&mut input))
                .map_err(|e| {
                    if e.is_io() {
                        return io(std::io::Error::from(e));
                    }
                    // Positions count from the document's start; the file's are wanted.
                    let message = e.to_string();
                    let message = match (e.line(), message.rsplit_once(" at line ")) {
                        (0, _) | (_, None) => message,
                        (1, Some((bare, _))) => {
                            format!("{bare} at line {line} column {}", column + e.column())
                        }
                        (n, Some((bare, _))) => {
                            format!("{bare} at line {} column {}", line + n - 1, e.column())
                        }
                    };
                    LoadError::Syntax {
                        path: path.to_path_buf(),
                        what: format!("document {document}"),
                        message,
                    }
                })?;
            self.add_document(&shared, document, doc)?;
        }
        Ok(())
    }

    fn add_document(
        &mut self,
        path: &Arc<Path>,
        document: usize,
        doc: Document,
    ) -> Result<(), LoadError> {
        let at = ObjectLocation {
            document,
            ..ObjectLocation::default()
        };
        let (fields, items) = match doc {
            // An empty document (`---` at the end, comments only).
            Document::Value(Value::Null) => return Ok(()),
            Document::Value(other) => return self.commit(path, prepare(path, at, other)?),
            Document::Map(fields, items) => (Value::Object(fields), items),
        };
        let kind = fields.get("kind").and_then(Value::as_str).unwrap_or("");
        let list = kind == "List" || (kind.ends_with("List") && !matches!(items, Items::None));
        if !list {
            // No kind the inventory reads has a top-level `items`: leaving it out changes
            // nothing for them.
            return self.commit(path, prepare(path, at, fields)?);
        }
        match items {
            Items::None => Ok(()),
            Items::NotAList => Err(object_error(
                path,
                locate(&fields, at),
                "`items` is not a list".into(),
            )),
            Items::Prepared(items) => items
                .into_iter()
                .try_for_each(|item| self.commit(path, item?)),
        }
    }

    /// Files a prepared object: rejects a second copy of an object, records invalid ones.
    fn commit(&mut self, path: &Arc<Path>, prepared: Prepared) -> Result<(), LoadError> {
        let Prepared { at, what } = prepared;
        if let Kind::Ignored(key) = &what {
            tracing::debug!(file = %path.display(), object = %at, kind = %key, "skipping object of a kind the inventory does not use");
            *self.summary.ignored.entry(key.clone()).or_default() += 1;
            return Ok(());
        }
        debug_assert!(what.is_used());
        if let (Some(kind), Some(name)) = (&at.kind, &at.name) {
            let key_ns = match kind.as_str() {
                "Namespace" => String::new(),
                _ => at.namespace.clone().unwrap_or_default(),
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
        let ns = at.namespace.clone().unwrap_or_default();
        let name = at.name.clone().unwrap_or_default();
        let path = path.clone();
        match what {
            Kind::Ignored(_) => {}
            Kind::Invalid(errors) => self.invalid.push(invalid_object(&path, &at, errors)),
            Kind::Namespace(obj) => self.namespaces.push(Found {
                path,
                at,
                obj: *obj,
            }),
            Kind::Pod(obj) => self.pods.push(Found {
                path,
                at,
                obj: *obj,
            }),
            Kind::Policy(obj) => self.policies.push(Found {
                path,
                at,
                obj: *obj,
            }),
            Kind::Service(obj) => self.services.push(*obj),
            Kind::ReplicaSet(refs) => {
                self.owners.insert_replicaset_refs(&ns, &name, &refs);
                self.summary.owners += 1;
            }
            Kind::Job(refs) => {
                self.owners.insert_job_refs(&ns, &name, &refs);
                self.summary.owners += 1;
            }
        }
        Ok(())
    }

    /// Converts everything, now that all owners are known (a Pod may come before its
    /// ReplicaSet).
    fn finish(self) -> Result<(Inventory, LoadSummary), LoadError> {
        let Loader {
            namespaces,
            pods,
            policies,
            services,
            owners,
            mut invalid,
            mut summary,
            ..
        } = self;
        // Objects were validated as they were read; a conversion error here would be a gap in
        // validation, reported the same way.
        fn conv<T>(f: &Found<T>, e: &ConvertError) -> InvalidObject {
            invalid_object(&f.path, &f.at, vec![e.to_string()])
        }
        let mut inv = Inventory::default();
        for f in &namespaces {
            match convert::namespace(&f.obj) {
                Ok(ns) => {
                    inv.namespaces.insert(ns.name.clone(), ns);
                }
                Err(e) => invalid.push(conv(f, &e)),
            }
        }
        for f in pods {
            let PreparedPod {
                mut model,
                owner,
                no_containers,
            } = f.obj;
            if no_containers {
                summary
                    .pods_without_containers
                    .push(format!("{}/{}", model.namespace, model.name));
            }
            if let Some(owner) = owner {
                model.workload = workload::resolve(
                    &model.namespace,
                    &model.name,
                    &model.labels,
                    std::slice::from_ref(&owner),
                    &owners,
                );
            }
            inv.pods.push(Arc::new(model));
        }
        for f in policies {
            let (path, at) = (f.path.clone(), f.at.clone());
            match convert::policy(f.obj) {
                Ok(policy) => inv.policies.push(policy),
                Err(e) => invalid.push(invalid_object(&path, &at, vec![e.to_string()])),
            }
        }
        // A Service with neither an address to attribute nor pods to name (ExternalName, or
        // headless without a selector) is not kept.
        inv.services = services
            .into_iter()
            .filter(Service::is_useful)
            .map(Arc::new)
            .collect();
        inv.services
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for o in &invalid {
            tracing::warn!(
                object = %o,
                "left out of the inventory: the API server would refuse this object"
            );
        }
        summary.pods_without_containers.sort();
        // One line for them all: a hand-written inventory may have many.
        for warning in summary.warnings() {
            tracing::warn!("{warning}");
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
                inv.namespaces
                    .insert(ns.clone(), convert::namespace_from_name(&ns));
                summary.implied_namespaces.push(ns);
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
    fn a_directory_tree_deeper_than_the_limit_is_refused_and_loops_are_walked_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        for _ in 0..MAX_DIR_DEPTH {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(
            deep.join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap();
        // A loop back to the top, at the deepest level: walked once, not followed.
        std::os::unix::fs::symlink(dir.path(), deep.join("loop")).unwrap();
        assert_eq!(manifest_files(dir.path()).unwrap().len(), 1);
        std::fs::create_dir(deep.join("d")).unwrap();
        std::fs::create_dir(deep.join("d").join("d")).unwrap();
        let e = manifest_files(dir.path()).unwrap_err().to_string();
        assert!(e.contains("nested more than 64 levels"), "{e}");
    }

    #[test]
    fn a_used_kind_with_a_misspelt_api_version_or_kind_is_invalid_not_ignored() {
        let inv = load(
            r#"
kind: NetworkPolicy
metadata: {name: no-api-version, namespace: prod}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/V1
kind: NetworkPolicy
metadata: {name: capital-v, namespace: prod}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1beta1
kind: NetworkPolicy
metadata: {name: beta, namespace: prod}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: networkpolicy
metadata: {name: lower-kind, namespace: prod}
spec: {podSelector: {}}
---
apiVersion: v1
kind: NetworkPolicy
metadata: {name: core-group, namespace: prod}
spec: {podSelector: {}}
---
kind: Namespace
metadata: {name: prod}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: calico, namespace: prod}
---
apiVersion: extensions/v1beta1
kind: ReplicaSet
metadata: {name: old, namespace: prod}
---
apiVersion: cilium.io/v2
kind: Job
metadata: {name: custom, namespace: prod}
"#,
        )
        .unwrap();
        assert!(inv.policies.is_empty());
        let mut names: Vec<String> = inv.invalid.iter().map(|i| i.to_string()).collect();
        names.sort();
        assert_eq!(names.len(), 7, "{names:#?}");
        for (name, why) in [
            ("no-api-version", "apiVersion: Required value"),
            (
                "capital-v",
                "apiVersion: Invalid value: \"networking.k8s.io/V1\"",
            ),
            (
                "beta",
                "apiVersion: Invalid value: \"networking.k8s.io/v1beta1\"",
            ),
            ("lower-kind", "kind: Invalid value: \"networkpolicy\""),
            ("core-group", "apiVersion: Invalid value: \"v1\""),
            ("prod", "a Namespace is `apiVersion: v1`"),
        ] {
            assert!(
                names.iter().any(|n| n.contains(name) && n.contains(why)),
                "{name}: {why} not in {names:#?}"
            );
        }
        // A built-in group that does not serve the kind is refused (extensions/v1beta1
        // ReplicaSet is gone since 1.16); another group's kind of the same name is another
        // kind: ignored.
        assert!(names.iter().any(|n| n.contains("old")));
        assert!(
            !names
                .iter()
                .any(|n| n.contains("calico") || n.contains("custom"))
        );
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
        // A byte-order mark before the first document is skipped, as in YAML.
        let bom = format!("\u{feff}{}", text.trim_start());
        let inv = load_str(Path::new("x.json"), &bom).unwrap();
        assert_eq!(inv.pods.len(), 3);
    }

    /// `port: .nan` made no port at all (every port allowed) where kubectl refuses the file;
    /// a port given as a string of digits, 0, a negative port, one past 65535 and an `endPort`
    /// below `port` are invalid objects, left out, as the API server refuses them.
    #[test]
    fn odd_policy_ports_are_refused_not_widened() {
        let e = load(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: nan, namespace: a}\n\
             spec: {podSelector: {}, ingress: [{ports: [{port: .nan}]}]}\n",
        )
        .unwrap_err();
        assert!(matches!(e, LoadError::Syntax { .. }), "{e}");
        let policy = |port: &str| {
            format!(
                "{{\"apiVersion\": \"networking.k8s.io/v1\", \"kind\": \"NetworkPolicy\", \
                 \"metadata\": {{\"name\": \"p\", \"namespace\": \"a\"}}, \"spec\": \
                 {{\"podSelector\": {{}}, \"ingress\": [{{\"ports\": [{port}]}}]}}}}"
            )
        };
        for (port, why) in [
            (r#"{"port": "80"}"#, "must contain at least one letter"),
            (r#"{"port": 0}"#, "must be between 1 and 65535"),
            (r#"{"port": -80}"#, "must be between 1 and 65535"),
            (r#"{"port": 65536}"#, "must be between 1 and 65535"),
            (r#"{"port": 1e30}"#, "cannot be read"),
            (r#"{"port": 80.5}"#, "cannot be read"),
            (
                r#"{"port": 90, "endPort": 80}"#,
                "must be greater than or equal to `port`",
            ),
        ] {
            let inv = load_str(Path::new("p.json"), &policy(port)).unwrap();
            assert!(inv.policies.is_empty(), "{port}");
            let errors = inv.invalid[0].errors.join("; ");
            assert!(errors.contains(why), "{port}: {errors}");
        }
    }

    /// The API server requires a container; a hand-written pod without one is kept (its labels
    /// and IP are what policies and attribution need) and named in the summary's warning.
    #[test]
    fn pods_without_containers_are_kept_and_reported() {
        let (inv, summary) = load_str_with_summary(
            Path::new("t.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: bare, namespace: a}\n\
             status: {podIP: 10.0.0.1}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: empty, namespace: a}\n\
             spec: {containers: []}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: nospec, namespace: a}\nspec: {}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: full, namespace: a}\n\
             spec: {containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}\n",
        )
        .unwrap();
        assert_eq!(inv.pods.len(), 4);
        assert!(inv.invalid.is_empty());
        assert_eq!(
            summary.pods_without_containers,
            ["a/bare", "a/empty", "a/nospec"]
        );
        let warnings = summary.warnings();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].starts_with("3 pod(s) without spec.containers"),
            "{warnings:?}"
        );
        assert!(
            warnings[0].ends_with(": a/bare, a/empty, a/nospec"),
            "{warnings:?}"
        );
        assert!(
            inv.pods
                .iter()
                .all(|p| p.name == "full" || p.ports.is_empty())
        );
        assert!(LoadSummary::default().warnings().is_empty());
    }

    /// serde_json keeps the last of two equal keys; the API server's strict decoding refuses
    /// them, as the YAML reader does. Wherever the key is: the document, a nested mapping, a
    /// List's `items` or an item of it.
    #[test]
    fn json_duplicate_keys_are_refused_like_yaml_ones() {
        let refused = |text: &str| {
            let e = load_str(Path::new("x.json"), text).unwrap_err();
            assert!(matches!(e, LoadError::Syntax { .. }), "{e}");
            e.to_string()
        };
        let e = refused(
            "{\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"name\": \"a\"}}\n\
             {\"apiVersion\": \"v1\", \"kind\": \"Pod\",\n \"metadata\": {\"name\": \"p\",\n  \
             \"labels\": {\"app\": \"a\", \"app\": \"b\"}}}",
        );
        assert_eq!(
            e,
            "x.json: document 2: duplicate key \"app\" (the API server refuses duplicate \
             fields) at line 4 column 31"
        );
        let e = refused("{\"kind\": \"Pod\", \"metadata\": {}, \"kind\": \"Namespace\"}");
        assert!(e.contains("duplicate key \"kind\""), "{e}");
        assert!(e.starts_with("x.json: document 1: "), "{e}");
        let e = refused("{\"kind\": \"List\", \"items\": [], \"items\": []}");
        assert!(e.contains("duplicate key \"items\""), "{e}");
        let e = refused(
            "{\"kind\": \"List\", \"items\": [{\"apiVersion\": \"v1\", \"kind\": \"Pod\", \
             \"metadata\": {\"name\": \"p\"}, \"spec\": {\"hostNetwork\": true, \"hostNetwork\": false}}]}",
        );
        assert!(e.contains("duplicate key \"hostNetwork\""), "{e}");
        // The same document in YAML gives the same message.
        let e = load("apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {app: a, app: b}}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("duplicate key \"app\" (the API server refuses duplicate fields) at line 3"),
            "{e}"
        );
        // Equal keys in different objects are fine.
        let inv = load_str(
            Path::new("x.json"),
            "{\"kind\": \"List\", \"items\": [\
             {\"apiVersion\": \"v1\", \"kind\": \"Pod\", \"metadata\": {\"name\": \"a\", \"labels\": {\"app\": \"x\"}}},\
             {\"apiVersion\": \"v1\", \"kind\": \"Pod\", \"metadata\": {\"name\": \"b\", \"labels\": {\"app\": \"x\"}}}]}",
        )
        .unwrap();
        assert_eq!(inv.pods.len(), 2);
    }

    #[test]
    fn json_errors_give_the_file_position_and_bad_utf8_is_an_io_error() {
        let text = "{\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"name\": \"a\"}}\n\n  {\"kind\":\n   \"Pod\" \"x\"}\n";
        let e = load_str(Path::new("x.json"), text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.json: document 2: expected `,` or `}` at line 4 column 10"
        );
        let e = load_str(Path::new("x.json"), "  {\"kind\" 1}").unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.json: document 1: expected `:` at line 1 column 11"
        );
        // Trailing garbage is a document of its own, refused.
        let e = load_str(
            Path::new("x.json"),
            "{\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"name\": \"a\"}} ]",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("x.json: document 2: "), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.json");
        std::fs::write(
            &file,
            b"{\"kind\": \"Pod\", \"metadata\": {\"name\": \"\xff\"}}",
        )
        .unwrap();
        let e = load_dir(dir.path()).unwrap_err();
        assert!(matches!(e, LoadError::Io { .. }), "{e}");
        assert!(e.to_string().contains("UTF-8"), "{e}");
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

    #[test]
    fn reloads_free_the_label_sets_of_dropped_inventories() {
        // Unique values: the interner is process-wide and other tests run concurrently.
        let value = |generation: usize| format!("reload-{generation}-a41c");
        let dir = tempfile::tempdir().unwrap();
        let mut current = None;
        for generation in 0..5 {
            std::fs::write(
                dir.path().join("pods.yaml"),
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: prod, \
                     labels: {{app: web, intern-reload-test: {}}}}}\n",
                    value(generation)
                ),
            )
            .unwrap();
            // As the daemon does: the previous inventory is dropped once the new one is in use.
            current = Some(load_dir(dir.path()).unwrap());
        }
        let current = current.unwrap();
        assert_eq!(
            current.pods[0].labels.get("intern-reload-test"),
            Some(value(4).as_str())
        );
        assert!(crate::inventory::labels::is_interned(&value(4)));
        // Generation 3 was still in use while generation 4 loaded; older ones were pruned.
        for generation in 0..=2 {
            assert!(
                !crate::inventory::labels::is_interned(&value(generation)),
                "generation {generation}'s labels outlived two reloads"
            );
        }
    }
}
