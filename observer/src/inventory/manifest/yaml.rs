//! YAML manifests read as a stream of parser events.
//!
//! `kubectl get -A -o yaml` writes a large cluster as one document: a List of tens of thousands
//! of objects. A reader that loads a whole document before handing out its first value holds
//! all of it at once; serde_yaml keeps every event of the document, a dozen times the text's
//! size (a 10,000-pod dump of 69 MiB peaked at 850 MiB). Here the file is parsed as it is read,
//! and each item of a List becomes a value that is prepared and dropped before the next item is
//! parsed: the peak is one item's value, whatever the file's size.
//!
//! Scalars resolve as serde_yaml resolves them for an untyped value (the YAML 1.2 core schema:
//! `~` and `null`, `true` and `false` in three spellings, decimal, `0x`, `0o` and `0b` integers,
//! floats; digits after a leading zero stay a string), so objects read from these values
//! deserialize as they did. `.inf` and `.nan` are the exception: serde_yaml made them null,
//! kubectl refuses them (JSON has neither), and so does this reader.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use granit_parser::{
    BorrowedInput, ErrorKind, Event, InputIoError, Options, Parser, ScalarStyle, ScanError, Span,
    Tag,
};
use serde_json::{Map, Number, Value};

use super::{Document, Items, LoadError, duplicate_key, prepare_item};

/// Deeper nesting is refused (serde_yaml's limit too): values are built recursively.
const MAX_DEPTH: usize = 128;
/// Nodes that aliases may copy into one document: a few anchors are fine, an alias bomb
/// (aliases of aliases, each doubling the size) is not.
const MAX_ALIASED_NODES: usize = 100_000;
/// Nodes aliases may copy in one load, all files and documents together: a per-document
/// budget alone let thousands of small documents, each just under it, cost minutes of CPU.
/// Dumps from the API server have no aliases at all; hand-written files use a few.
pub(super) const MAX_ALIASED_NODES_PER_LOAD: usize = 1_000_000;

/// Why a YAML stream could not be read.
#[derive(Debug)]
enum YamlError {
    /// Not YAML, or YAML this reader refuses; the message ends with line and column.
    Syntax(String),
    /// The input could not be read (I/O, or not UTF-8).
    Io(std::io::Error),
}

/// The characters of a UTF-8 reader, read a line at a time.
pub(super) struct Chars<R> {
    reader: R,
    line: String,
    pos: usize,
    failed: bool,
}

impl<R: BufRead> Chars<R> {
    pub(super) fn new(reader: R) -> Self {
        Self {
            reader,
            line: String::new(),
            pos: 0,
            failed: false,
        }
    }
}

impl<R: BufRead> Iterator for Chars<R> {
    type Item = Result<char, ErrorKind>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(c) = self
                .line
                .get(self.pos..)
                .and_then(|rest| rest.chars().next())
            {
                self.pos += c.len_utf8();
                return Some(Ok(c));
            }
            if self.failed {
                return None;
            }
            self.line.clear();
            self.pos = 0;
            match self.reader.read_line(&mut self.line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    self.failed = true;
                    return Some(Err(ErrorKind::InputIo {
                        error: InputIoError::from_io(e),
                    }));
                }
            }
        }
    }
}

/// The parser options: comments are skipped, not reported.
fn options() -> Options {
    let mut options = Options::default();
    options.set_emit_comments(false);
    options
}

/// A parser over text.
pub(super) fn from_str(text: &str) -> Parser<'_, granit_parser::StrInput<'_>> {
    Parser::new_from_str_with_options(text, options())
}

/// A parser over a reader, which is read as the parser needs it.
pub(super) fn from_reader<R: BufRead>(
    reader: R,
) -> Parser<'static, granit_parser::FallibleBufferedInput<Chars<R>>> {
    Parser::new_from_fallible_iter_with_options(Chars::new(reader), options())
}

/// Reads every document of `parser`, handing each to `each` with its 1-based number as soon as
/// it is complete; the items of a List document are prepared while it is parsed.
pub(super) fn documents<'i, T: BorrowedInput<'i>>(
    parser: Parser<'i, T>,
    path: &Path,
    aliased_in_load: &mut usize,
    each: impl FnMut(usize, Document) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let mut stream = Stream {
        parser,
        anchors: HashMap::new(),
        aliased: 0,
        aliased_before: *aliased_in_load,
    };
    let result = stream.documents(path, each);
    *aliased_in_load = stream.aliased_before.saturating_add(stream.aliased);
    result
}

impl<'i, T: BorrowedInput<'i>> Stream<'i, T> {
    fn documents(
        &mut self,
        path: &Path,
        mut each: impl FnMut(usize, Document) -> Result<(), LoadError>,
    ) -> Result<(), LoadError> {
        let stream = self;
        let mut document = 0;
        let error = |document: usize, e: YamlError| match e {
            YamlError::Syntax(message) => LoadError::Syntax {
                path: path.to_path_buf(),
                what: format!("document {document}"),
                message,
            },
            YamlError::Io(source) => LoadError::Io {
                path: path.to_path_buf(),
                source,
            },
        };
        loop {
            // Outside a document, an error is in the one that would have come next.
            let (event, span) = stream.next().map_err(|e| error(document + 1, e))?;
            match event {
                Event::StreamStart => {}
                Event::StreamEnd => return Ok(()),
                Event::DocumentStart(..) => {
                    document += 1;
                    stream.anchors.clear();
                    stream.aliased_before = stream.aliased_before.saturating_add(stream.aliased);
                    stream.aliased = 0;
                    let doc = stream
                        .document(path, document)
                        .map_err(|e| error(document, e))?;
                    each(document, doc)?;
                }
                _ => return Err(error(document + 1, at(&span, "expected a document"))),
            }
        }
    }
}

struct Stream<'i, T: BorrowedInput<'i>> {
    parser: Parser<'i, T>,
    /// The values of the current document's anchored nodes, by anchor id.
    anchors: HashMap<usize, Value>,
    /// Nodes copied by aliases so far in the current document.
    aliased: usize,
    /// Nodes copied by aliases in the load before the current document.
    aliased_before: usize,
}

impl<'i, T: BorrowedInput<'i>> Stream<'i, T> {
    fn next(&mut self) -> Result<(Event<'i>, Span), YamlError> {
        match self.parser.next_event() {
            Some(Ok(next)) => Ok(next),
            Some(Err(e)) => Err(scan_error(&e)),
            None => Err(YamlError::Syntax("unexpected end of the stream".into())),
        }
    }

    /// One document, after its start: a mapping's `items` go through [`Self::items`].
    fn document(&mut self, path: &Path, document: usize) -> Result<Document, YamlError> {
        let (event, span) = self.next()?;
        let doc = match event {
            Event::MappingStart(_, _, tag) => {
                collection_tag(tag.as_deref(), &span)?;
                let mut fields = Map::new();
                let mut items = Items::None;
                let mut had_items = false;
                while let Some((key, key_span)) = self.key(1)? {
                    if key == "items" {
                        if std::mem::replace(&mut had_items, true) {
                            return Err(duplicate(&key, &key_span));
                        }
                        items = self.items(path, document)?;
                    } else {
                        if fields.contains_key(&key) {
                            return Err(duplicate(&key, &key_span));
                        }
                        let value = self.value(1)?;
                        fields.insert(key, value);
                    }
                }
                Document::Map(fields, items)
            }
            other => Document::Value(self.node(other, &span, 0)?),
        };
        match self.next()? {
            (Event::DocumentEnd, _) => Ok(doc),
            (_, span) => Err(at(&span, "expected the end of the document")),
        }
    }

    /// A List's `items`, each prepared as soon as it is parsed.
    fn items(&mut self, path: &Path, document: usize) -> Result<Items, YamlError> {
        let (event, span) = self.next()?;
        let Event::SequenceStart(_, _, tag) = event else {
            // An alias to a sequence is still a list; anything else is not.
            return Ok(match self.node(event, &span, 1)? {
                Value::Null => Items::None,
                Value::Array(values) => Items::Prepared(
                    values
                        .into_iter()
                        .enumerate()
                        .map(|(i, item)| prepare_item(path, document, i, item))
                        .collect(),
                ),
                _ => Items::NotAList,
            });
        };
        collection_tag(tag.as_deref(), &span)?;
        let mut out = Vec::new();
        loop {
            let (event, span) = self.next()?;
            if matches!(event, Event::SequenceEnd) {
                return Ok(Items::Prepared(out));
            }
            let item = self.node(event, &span, 2)?;
            out.push(prepare_item(path, document, out.len(), item));
        }
    }

    /// The next mapping key, as text, or `None` at the mapping's end.
    /// The next key of a mapping and where it is, or `None` at the mapping's end.
    fn key(&mut self, depth: usize) -> Result<Option<(String, Span)>, YamlError> {
        let (event, span) = self.next()?;
        let key = match event {
            Event::MappingEnd => return Ok(None),
            // A key is its text whatever it resolves to (`1: x` has the key "1").
            Event::Scalar(text, style, anchor, tag) => {
                if anchor != 0 {
                    let value = scalar(&text, style, tag.as_deref()).map_err(|m| at(&span, &m))?;
                    self.anchors.insert(anchor, value);
                }
                text.into_owned()
            }
            other => match self.node(other, &span, depth)? {
                Value::String(s) => s,
                Value::Null => "null".into(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                Value::Array(_) | Value::Object(_) => {
                    return Err(at(&span, "a mapping key must be a scalar"));
                }
            },
        };
        Ok(Some((key, span)))
    }

    fn value(&mut self, depth: usize) -> Result<Value, YamlError> {
        let (event, span) = self.next()?;
        self.node(event, &span, depth)
    }

    /// The value of the node that starts with `event`.
    fn node(&mut self, event: Event<'i>, span: &Span, depth: usize) -> Result<Value, YamlError> {
        if depth > MAX_DEPTH {
            return Err(at(
                span,
                "recursion limit exceeded: nested more than 128 levels deep",
            ));
        }
        let (value, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => (
                scalar(&text, style, tag.as_deref()).map_err(|m| at(span, &m))?,
                anchor,
            ),
            Event::SequenceStart(_, anchor, tag) => {
                collection_tag(tag.as_deref(), span)?;
                let mut out = Vec::new();
                loop {
                    let (event, span) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    out.push(self.node(event, &span, depth + 1)?);
                }
                (Value::Array(out), anchor)
            }
            Event::MappingStart(_, anchor, tag) => {
                collection_tag(tag.as_deref(), span)?;
                let mut map = Map::new();
                while let Some((key, key_span)) = self.key(depth + 1)? {
                    if map.contains_key(&key) {
                        return Err(duplicate(&key, &key_span));
                    }
                    let value = self.value(depth + 1)?;
                    map.insert(key, value);
                }
                (Value::Object(map), anchor)
            }
            Event::Alias(id) => return self.alias(id, span),
            _ => return Err(at(span, "expected a value")),
        };
        if anchor != 0 {
            self.anchors.insert(anchor, value.clone());
        }
        Ok(value)
    }

    fn alias(&mut self, id: usize, span: &Span) -> Result<Value, YamlError> {
        let Some(value) = self.anchors.get(&id) else {
            // The parser resolves every alias to an anchor before it; only the anchors of the
            // nodes being streamed (the document's mapping, a List's items) are not kept.
            return Err(at(span, "an alias to a node that contains it"));
        };
        self.aliased = self.aliased.saturating_add(nodes(value));
        if self.aliased > MAX_ALIASED_NODES {
            return Err(at(
                span,
                &format!(
                    "repetition limit exceeded: aliases copy more than {MAX_ALIASED_NODES} nodes \
                     into the document"
                ),
            ));
        }
        if self.aliased_before.saturating_add(self.aliased) > MAX_ALIASED_NODES_PER_LOAD {
            return Err(at(
                span,
                &format!(
                    "repetition limit exceeded: aliases copy more than \
                     {MAX_ALIASED_NODES_PER_LOAD} nodes into the documents of this load"
                ),
            ));
        }
        Ok(value.clone())
    }
}

fn nodes(value: &Value) -> usize {
    match value {
        Value::Array(values) => 1 + values.iter().map(nodes).sum::<usize>(),
        Value::Object(map) => 1 + map.values().map(nodes).sum::<usize>(),
        _ => 1,
    }
}

/// A key given twice in one mapping (see [`duplicate_key`]).
fn duplicate(key: &str, span: &Span) -> YamlError {
    at(span, &duplicate_key(key))
}

fn at(span: &Span, message: &str) -> YamlError {
    YamlError::Syntax(format!(
        "{message} at line {} column {}",
        span.start.line(),
        span.start.col() + 1
    ))
}

fn scan_error(e: &ScanError) -> YamlError {
    if let ErrorKind::InputIo { error } = e.kind() {
        return YamlError::Io(match error.io_error() {
            Some(io) => std::io::Error::new(io.kind(), io.to_string()),
            None => std::io::Error::other(error.message().to_owned()),
        });
    }
    let mark = e.marker();
    YamlError::Syntax(format!(
        "{} at line {} column {}",
        e.info(),
        mark.line(),
        mark.col() + 1
    ))
}

/// An application's own tag (`!foo`) names a type this reader does not know.
fn is_local(tag: &Tag) -> bool {
    tag.handle().starts_with('!')
}

fn collection_tag(tag: Option<&Tag>, span: &Span) -> Result<(), YamlError> {
    match tag {
        Some(tag) if is_local(tag) => Err(at(
            span,
            &format!("tag {} is not supported", tag.original()),
        )),
        _ => Ok(()),
    }
}

/// A scalar's value: its tag's type when it has a core one, else resolved from a plain
/// scalar's text; quoted and block scalars are strings.
fn scalar(text: &str, style: ScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    let Some(tag) = tag else {
        return Ok(match style {
            ScalarStyle::Plain => untagged(text)?,
            _ => Value::String(text.to_owned()),
        });
    };
    let invalid = |what: &str| format!("invalid value {text:?}, expected {what}");
    match tag.core_suffix() {
        Some("bool") => parse_bool(text)
            .map(Value::Bool)
            .ok_or_else(|| invalid("a boolean")),
        Some("int") => parse_int(text).ok_or_else(|| invalid("an integer")),
        Some("float") => parse_f64(text)
            .ok_or_else(|| invalid("a float"))
            .and_then(|f| float(text, f)),
        Some("null") => is_null(text)
            .then_some(Value::Null)
            .ok_or_else(|| invalid("null")),
        _ if is_local(tag) => Err(format!("tag {} is not supported", tag.original())),
        _ => Ok(Value::String(text.to_owned())),
    }
}

fn untagged(text: &str) -> Result<Value, String> {
    if text.is_empty() || is_null(text) {
        return Ok(Value::Null);
    }
    if let Some(b) = parse_bool(text) {
        return Ok(Value::Bool(b));
    }
    if let Some(n) = parse_int(text) {
        return Ok(n);
    }
    if !digits_but_not_number(text)
        && let Some(f) = parse_f64(text)
    {
        return float(text, f);
    }
    Ok(Value::String(text.to_owned()))
}

/// JSON has no infinity or NaN, so kubectl, which turns YAML into JSON before sending it,
/// refuses `.nan` and `.inf`. serde_yaml makes them null instead, which read `port: .nan` in a
/// NetworkPolicy as no port at all: every port allowed, by a policy the cluster cannot have.
fn float(text: &str, f: f64) -> Result<Value, String> {
    Number::from_f64(f).map(Value::Number).ok_or_else(|| {
        format!(
            "invalid value {text:?}: JSON has no NaN or infinity, so kubectl and the API \
             server refuse it"
        )
    })
}

fn is_null(text: &str) -> bool {
    matches!(text, "~" | "null" | "Null" | "NULL")
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

fn parse_int(text: &str) -> Option<Value> {
    parse_unsigned(text)
        .map(Value::from)
        .or_else(|| parse_negative(text).map(Value::from))
}

const RADIXES: [(&str, u32); 3] = [("0x", 16), ("0o", 8), ("0b", 2)];

fn parse_unsigned(text: &str) -> Option<u64> {
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    for (prefix, radix) in RADIXES {
        if let Some(rest) = unsigned.strip_prefix(prefix) {
            if rest.starts_with(['+', '-']) {
                return None;
            }
            if let Ok(n) = u64::from_str_radix(rest, radix) {
                return Some(n);
            }
        }
    }
    if unsigned.starts_with(['+', '-']) || digits_but_not_number(text) {
        return None;
    }
    unsigned.parse().ok()
}

fn parse_negative(text: &str) -> Option<i64> {
    for (prefix, radix) in RADIXES {
        if let Some(rest) = text.strip_prefix('-').and_then(|t| t.strip_prefix(prefix))
            && let Ok(n) = i64::from_str_radix(&format!("-{rest}"), radix)
        {
            return Some(n);
        }
    }
    if digits_but_not_number(text) {
        return None;
    }
    text.parse().ok()
}

fn parse_f64(text: &str) -> Option<f64> {
    let unsigned = match text.strip_prefix('+') {
        Some(rest) if rest.starts_with(['+', '-']) => return None,
        Some(rest) => rest,
        None => text,
    };
    match unsigned {
        ".inf" | ".Inf" | ".INF" => return Some(f64::INFINITY),
        _ => {}
    }
    match text {
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    unsigned.parse::<f64>().ok().filter(|f| f.is_finite())
}

/// Leading zeros before digits make a string in YAML 1.2 (`0755` is not 755 nor 493).
fn digits_but_not_number(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    digits.len() > 1 && digits.starts_with('0') && digits[1..].bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The documents of `text` as values, through the streaming reader and through serde_yaml.
    fn both(text: &str) -> (Vec<Value>, Vec<Value>) {
        let mut streamed = Vec::new();
        documents(from_str(text), Path::new("t.yaml"), &mut 0, |_, doc| {
            streamed.push(match doc {
                Document::Value(v) => v,
                Document::Map(fields, _) => Value::Object(fields),
            });
            Ok(())
        })
        .unwrap();
        let reference = serde_yaml::Deserializer::from_str(text)
            .map(|de| serde::Deserialize::deserialize(de).unwrap())
            .collect();
        (streamed, reference)
    }

    #[test]
    fn scalars_resolve_as_serde_yaml_resolves_them() {
        let text = r#"
plain: [~, null, Null, NULL, "", true, True, TRUE, false, FALSE, yes, no, on, off]
ints: [0, 7, +7, -7, 0x1F, 0o17, 0b101, -0x10, 0755, -012, +0, 18446744073709551615, -9223372036854775808]
floats: [1.5, -1.5, 1e3, .5, +.5, 1., inf, nan, 1_000]
strings: ["1", '2', "true", x1, 1.2.3, 10.0.0.1, 8080/TCP, "~", '', 0x, 0xZZ, +-1, --1]
empty:
tagged: [!!str 1, !!str true, !!int "12", !!float "1", !!bool "true", !!null "~", !!binary aGk=]
block: |
  line 1
  line 2
folded: >-
  a
  b
"quoted key": 1
1: numeric key
true: bool key
"#;
        let (streamed, reference) = both(text);
        assert_eq!(streamed, reference);
        assert_eq!(streamed[0]["ints"][4], json!(31));
        assert_eq!(streamed[0]["ints"][8], json!("0755"));
        assert_eq!(streamed[0]["strings"][5], json!("10.0.0.1"));
        assert_eq!(streamed[0]["1"], json!("numeric key"));
    }

    #[test]
    fn documents_anchors_and_flow_style_as_serde_yaml() {
        let text = "---\na: &x {b: [1, 2], c: 'd'}\ne: *x\nf: &y 3\ng: [*y, *y]\n---\n# only a comment\n---\n- 1\n- [2, {3: 4}]\n...\n---\nplain text\n";
        let (streamed, reference) = both(text);
        assert_eq!(streamed, reference);
        assert_eq!(streamed.len(), 4);
        assert_eq!(streamed[0]["e"], json!({"b": [1, 2], "c": "d"}));
    }

    #[test]
    fn local_tags_alias_bombs_and_syntax_errors_are_refused() {
        let refused = |text: &str| {
            let e =
                documents(from_str(text), Path::new("t.yaml"), &mut 0, |_, _| Ok(())).unwrap_err();
            assert!(matches!(e, LoadError::Syntax { .. }), "{e}");
            e.to_string()
        };
        assert!(refused("a: !custom 1\n").contains("tag !custom is not supported"));
        for nan in ["a: .nan\n", "a: [-.Inf]\n", "a: {b: !!float .inf}\n"] {
            let e = refused(nan);
            assert!(e.contains("JSON has no NaN or infinity"), "{e}");
            assert!(e.contains("at line 1 column "), "{e}");
        }
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(
            refused(&bomb)
                .contains("repetition limit exceeded: aliases copy more than 100000 nodes")
        );
        let e = refused("metadata: {name: a}\nspec: {}\nmetadata: {name: b}\n");
        assert!(e.contains("duplicate key \"metadata\""), "{e}");
        assert!(e.contains("at line 3 column 1"), "{e}");
        let e = refused("metadata:\n  labels: {app: a, app: b}\n");
        assert!(e.contains("duplicate key \"app\""), "{e}");
        let e = refused("kind: List\nitems: []\nitems: []\n");
        assert!(e.contains("duplicate key \"items\""), "{e}");
        let e = refused("ok: 1\n---\na: [unclosed\n");
        assert!(e.starts_with("t.yaml: document 2: "), "{e}");
        assert!(e.contains(" at line 3 column "), "{e}");
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(refused(&deep).contains("recursion limit exceeded"));

        // Many documents, each under the per-document limit (10^4 nodes), add up to the
        // load's limit: the budget is not renewed by `---`.
        let mut small = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..4 {
            let p = i - 1;
            small.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(documents(from_str(&small), Path::new("t.yaml"), &mut 0, |_, _| Ok(())).is_ok());
        let many = vec![small.as_str(); 120].join("---\n");
        let mut aliased = 0;
        let e = documents(
            from_str(&many),
            Path::new("t.yaml"),
            &mut aliased,
            |_, _| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nodes into the documents of this load"), "{e}");
        // And it carries over from one file to the next of the same load.
        let mut aliased = MAX_ALIASED_NODES_PER_LOAD - 100;
        let e = documents(
            from_str(&small),
            Path::new("u.yaml"),
            &mut aliased,
            |_, _| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nodes into the documents of this load"), "{e}");
    }

    #[test]
    fn a_reader_is_read_as_parsed_and_bad_utf8_is_an_io_error() {
        let text = "a: 1\n---\nb: [2, 3]\n";
        let mut seen = Vec::new();
        documents(
            from_reader(std::io::BufReader::with_capacity(4, text.as_bytes())),
            Path::new("t.yaml"),
            &mut 0,
            |n, doc| {
                if let Document::Map(fields, _) = doc {
                    seen.push((n, Value::Object(fields)));
                }
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, [(1, json!({"a": 1})), (2, json!({"b": [2, 3]}))]);

        let bad: &[u8] = b"a: 1\nb: \xff\xfe\n";
        let e =
            documents(from_reader(bad), Path::new("t.yaml"), &mut 0, |_, _| Ok(())).unwrap_err();
        assert!(matches!(e, LoadError::Io { .. }), "{e}");
    }
}
