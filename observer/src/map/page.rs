//! The map page: one HTML file with its scripts, styles and data inlined, so that it opens
//! from a file, a CI artifact or an air-gapped laptop without any network access.
//!
//! Its Content-Security-Policy allows no inline code but the page's own: each inline script and
//! style is named by its SHA-256 (computed once, from the exact text the page embeds), so a
//! name in the data that somehow became markup could not run or style anything, with
//! `--output` as with `--listen`. The data is a `type="application/json"` block, which browsers
//! never execute and the policy does not list.

use std::collections::HashMap;
use std::sync::LazyLock;

use base64::Engine as _;
use serde_json::{Value, json};

use super::MapData;

/// Cytoscape.js, vendored unmodified (see `assets/README.md` and `assets/LICENSE-cytoscape`).
const CYTOSCAPE_JS: &str = include_str!("assets/cytoscape.min.js");
/// Version of `CYTOSCAPE_JS`.
pub const CYTOSCAPE_VERSION: &str = "3.34.4";
const MAP_JS: &str = include_str!("assets/map.js");
const MAP_CSS: &str = include_str!("assets/map.css");

/// The one rule Cytoscape adds to the document itself, as a `<style>` element, when it first
/// draws into a container (`__________cytoscape_stylesheet` in its source). The policy names
/// its hash; a new Cytoscape that writes another rule fails `cytoscape_writes_the_rule_we_hash`.
const CYTOSCAPE_CONTAINER_CSS: &str = ".__________cytoscape_container { position: relative; }";

/// The page's inline code, exactly as embedded, and the policies that allow it and nothing else.
struct Inline {
    cytoscape: String,
    map_js: String,
    map_css: String,
    page_csp: String,
    header_csp: String,
}

/// `'sha256-<base64>'` of `text`, a CSP source for the inline element with that exact text.
fn csp_hash(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

static INLINE: LazyLock<Inline> = LazyLock::new(|| {
    let cytoscape = format!(
        "\n/* Cytoscape.js {CYTOSCAPE_VERSION}, MIT licence (see the licence header below) */\n{CYTOSCAPE_JS}\n"
    );
    let map_js = format!("\n{MAP_JS}\n");
    let map_css = format!("\n{MAP_CSS}");
    // Nothing loads from elsewhere, since the page is data for an incident, possibly offline;
    // only `--listen`'s `data.json` is fetched.
    let page_csp = format!(
        "default-src 'none'; script-src {} {}; style-src {} {}; img-src data: blob:; \
         connect-src 'self'; base-uri 'none'; form-action 'none'",
        csp_hash(&cytoscape),
        csp_hash(&map_js),
        csp_hash(&map_css),
        csp_hash(CYTOSCAPE_CONTAINER_CSS),
    );
    // `frame-ancestors` only works in a header: no other site may frame the map.
    let header_csp = format!("{page_csp}; frame-ancestors 'none'");
    Inline {
        cytoscape,
        map_js,
        map_css,
        page_csp,
        header_csp,
    }
});

/// The page's Content-Security-Policy (its `<meta>`): the hashes of its own scripts and
/// styles, nothing from elsewhere, and `connect-src 'self'` for `--listen`'s `data.json`.
pub fn page_csp() -> &'static str {
    &INLINE.page_csp
}

/// The policy `--listen` sends as a header: [`page_csp`] plus `frame-ancestors 'none'`, which
/// only a header can carry. One source for both, so that the header never allows what the
/// page's own policy forbids.
pub fn header_csp() -> &'static str {
    &INLINE.header_csp
}

/// The document as the page reads it: each edge's `explain` answer as indexes into
/// `explain_lines`, the lines all answers share. Answers repeat most of their lines (the same
/// workloads, pods and policies), and the embedded data is what the browser parses before it
/// draws anything: this halves the page of a 10,000-edge map.
fn page_value(data: &MapData) -> Result<Value, serde_json::Error> {
    let mut value = serde_json::to_value(data)?;
    let mut lines: Vec<&str> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    if let Some(edges) = value.get_mut("edges").and_then(Value::as_array_mut) {
        for (edge, source) in edges.iter_mut().zip(&data.edges) {
            let ids: Vec<usize> = source
                .explain
                .split('\n')
                .map(|line| {
                    let next = lines.len();
                    let id = *index.entry(line).or_insert(next);
                    if id == next {
                        lines.push(line);
                    }
                    id
                })
                .collect();
            edge["explain"] = json!(ids);
        }
    }
    value["explain_lines"] = json!(lines);
    Ok(value)
}

/// The data as JSON that is safe inside a `<script>` element: `<`, `>` and `&` are escaped
/// as JSON `\u` sequences, so no policy or workload name can close the element. Explain
/// answers are shared lines (see `page_value`).
pub fn script_json(data: &MapData) -> String {
    let json = page_value(data).and_then(|v| serde_json::to_string(&v)).unwrap_or_else(|e| {
        // Serializing plain strings and numbers cannot fail; should it, the page says so.
        format!("{{\"schema_version\":1,\"error\":\"serializing the map: {e}\",\"nodes\":[],\"edges\":[],\"namespaces\":[],\"windows\":[],\"window_seconds\":[],\"notes\":[]}}")
    });
    let mut out = String::with_capacity(json.len() + 64);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The whole page for `data`.
pub fn render(data: &MapData) -> String {
    let inline = &*INLINE;
    let json = script_json(data);
    let title = format!("deny-observer traffic map: {}", escape_html(&data.source));
    let mut page =
        String::with_capacity(inline.cytoscape.len() + json.len() + MAP_JS.len() + 16 * 1024);
    page.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    page.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    page.push_str(&format!(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"{}\">\n",
        inline.page_csp
    ));
    page.push_str(&format!("<title>{title}</title>\n<style>"));
    page.push_str(&inline.map_css);
    page.push_str("</style>\n</head>\n<body>\n");
    page.push_str(BODY);
    page.push_str("<script id=\"map-data\" type=\"application/json\">");
    page.push_str(&json);
    page.push_str("</script>\n<script>");
    page.push_str(&inline.cytoscape);
    page.push_str("</script>\n<script>");
    page.push_str(&inline.map_js);
    page.push_str("</script>\n</body>\n</html>\n");
    page
}

const BODY: &str = r#"<header>
  <h1>Traffic map</h1>
  <p id="source"></p>
  <div id="banner" role="alert" hidden></div>
  <form id="filters" aria-label="Filters">
    <label>Namespace <select id="filter-namespace"><option value="*">all</option></select></label>
    <label><input type="checkbox" id="filter-denied"> denied only</label>
    <label>Window <select id="filter-window"></select></label>
    <label><input type="checkbox" id="filter-aggregate"> namespaces only</label>
    <span id="counts" aria-live="polite"></span>
  </form>
  <ul id="legend" aria-label="Legend">
    <li><span class="swatch allowed"></span>allowed (width: rate)</li>
    <li><span class="swatch denied"></span>denied, labelled with the deciding policies</li>
    <li><span class="swatch unexplained"></span>denied although the policies allow it (<code>unexplained</code>)</li>
    <li><span class="swatch open"></span>open field: namespace without NetworkPolicy</li>
  </ul>
</header>
<main>
  <div id="graph" role="img" aria-label="Traffic graph; the same nodes and edges are listed below"></div>
  <aside id="details" aria-live="polite"><p class="hint">Select an edge (in the graph or in the list) for its counts, protocol, port and the explain answer. Select a namespace box to expand or collapse it.</p></aside>
</main>
<section id="lists" aria-label="Every workload and edge">
  <h2>Edges</h2>
  <div id="edge-list"></div>
  <h2>Workloads</h2>
  <div class="chunk"><ul id="workload-list"></ul></div>
</section>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_answers_share_their_lines_and_read_back_whole() {
        let edge = |target: &str, explain: &str| super::super::MapEdge {
            source: "shop/web".to_owned(),
            target: target.to_owned(),
            verdict: "denied",
            protocol: "tcp".to_owned(),
            port: None,
            observed: vec![1],
            policy: String::new(),
            matched: None,
            judged: "deny",
            explain: explain.to_owned(),
            count_ports: Vec::new(),
        };
        let data = MapData {
            schema_version: 1,
            generated_unix: 0,
            source: String::new(),
            windows: vec![],
            window_seconds: vec![],
            namespaces: vec![],
            nodes: vec![],
            edges: vec![
                edge("shop/api", "verdict: DENY a\nfrom shop/web\nshared\n"),
                edge("shop/db", "verdict: DENY b\nfrom shop/web\nshared\n"),
                edge("shop/x", ""),
            ],
            edges_left_out: 0,
            full_detail_max_workloads: 1,
            full_detail_max_edges: 1,
            refresh_seconds: None,
            error: None,
            notes: vec![],
        };
        let page: Value = serde_json::from_str(&script_json(&data)).unwrap_or_default();
        let lines: Vec<&str> = page["explain_lines"]
            .as_array()
            .map(|l| l.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(
            lines,
            [
                "verdict: DENY a",
                "from shop/web",
                "shared",
                "",
                "verdict: DENY b"
            ],
            "each line once"
        );
        for (i, want) in data.edges.iter().enumerate() {
            let text: Vec<&str> = page["edges"][i]["explain"]
                .as_array()
                .map(|ids| {
                    ids.iter()
                        .filter_map(|id| lines.get(usize::try_from(id.as_u64()?).ok()?).copied())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(text.join("\n"), want.explain, "edge {i}");
        }
    }

    fn empty() -> MapData {
        MapData {
            schema_version: 1,
            generated_unix: 0,
            source: String::new(),
            windows: vec![],
            window_seconds: vec![],
            namespaces: vec![],
            nodes: vec![],
            edges: vec![],
            edges_left_out: 0,
            full_detail_max_workloads: 1,
            full_detail_max_edges: 1,
            refresh_seconds: None,
            error: None,
            notes: vec![],
        }
    }

    /// Each `<tag ...>text</tag>` of `page`: (the opening tag, the text).
    fn elements<'a>(page: &'a str, tag: &str) -> Vec<(&'a str, &'a str)> {
        let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
        let mut out = Vec::new();
        let mut rest = page;
        while let Some(at) = rest.find(&open) {
            let from = &rest[at..];
            let Some(gt) = from.find('>') else { break };
            let Some(end) = from.find(&close) else { break };
            out.push((&from[..=gt], &from[gt + 1..end]));
            rest = &from[end + close.len()..];
        }
        out
    }

    #[test]
    fn the_policy_allows_the_pages_own_inline_code_and_nothing_else() {
        let page = render(&empty());
        let csp = page_csp();
        for keyword in [
            "'unsafe-inline'",
            "'unsafe-eval'",
            "'unsafe-hashes'",
            "'self' 'unsafe",
        ] {
            assert!(!csp.contains(keyword), "{keyword} in {csp}");
        }
        assert!(
            page.contains(&format!("content=\"{csp}\"")),
            "the meta carries it"
        );
        assert_eq!(header_csp(), format!("{csp}; frame-ancestors 'none'"));
        let scripts = elements(&page, "script");
        assert_eq!(scripts.len(), 3, "data, Cytoscape, map.js");
        for (tag, text) in scripts {
            let allowed = csp.contains(&csp_hash(text));
            if tag.contains("type=\"application/json\"") {
                assert!(!allowed, "the data is never a script the policy runs");
            } else {
                assert!(allowed, "{tag}: its hash is in the policy");
            }
        }
        let styles = elements(&page, "style");
        assert_eq!(styles.len(), 1);
        assert!(csp.contains(&csp_hash(styles[0].1)), "map.css");
        assert!(csp.contains(&csp_hash(CYTOSCAPE_CONTAINER_CSS)));
        // Inline handlers and style attributes need 'unsafe-inline' (or 'unsafe-hashes'):
        // neither the markup nor the markup map.js writes may carry any.
        for (what, text) in [("BODY", BODY), ("map.js", MAP_JS)] {
            assert!(!text.contains("style="), "{what}: a style attribute");
            let lower = text.to_ascii_lowercase();
            for handler in [
                " onclick=",
                " onsubmit=",
                " onload=",
                " onerror=",
                " onchange=",
                "javascript:",
            ] {
                assert!(!lower.contains(handler), "{what}: {handler}");
            }
        }
    }

    #[test]
    fn the_assets_embed_as_one_element_each_and_hash_as_the_browser_reads_them() {
        // The HTML parser ends a script at `</script` and a style at `</style`, whatever the
        // case, and turns CR LF into LF and NUL into U+FFFD before the browser hashes the text.
        for (name, text, end) in [
            ("cytoscape.min.js", CYTOSCAPE_JS, "</script"),
            ("map.js", MAP_JS, "</script"),
            ("map.css", MAP_CSS, "</style"),
        ] {
            let lower = text.to_ascii_lowercase();
            assert!(!lower.contains(end), "{name} would end its element");
            assert!(!lower.contains("<!--"), "{name}: script data escape");
            assert!(
                !text.contains(['\r', '\0']),
                "{name}: the browser would hash other text"
            );
        }
    }

    #[test]
    fn cytoscape_writes_the_rule_we_hash() {
        // `u.textContent="."+s+" { position: relative; }"` with s the container class.
        let (class, rule) = CYTOSCAPE_CONTAINER_CSS.split_once(' ').unwrap_or_default();
        assert!(CYTOSCAPE_JS.contains(&format!("\"{}\"", &class[1..])));
        assert!(CYTOSCAPE_JS.contains(&format!("\".\"+s+\" {rule}\"")));
        assert_eq!(CYTOSCAPE_JS.matches("createElement(\"style\")").count(), 1);
    }

    #[test]
    fn script_json_cannot_close_the_script_element() {
        let data = MapData {
            schema_version: 1,
            generated_unix: 0,
            source: "</script><script>alert(1)</script>".to_owned(),
            windows: vec![],
            window_seconds: vec![],
            namespaces: vec![],
            nodes: vec![],
            edges: vec![],
            edges_left_out: 0,
            full_detail_max_workloads: 1,
            full_detail_max_edges: 1,
            refresh_seconds: None,
            error: None,
            notes: vec!["a & b\u{2028}".to_owned()],
        };
        let json = script_json(&data);
        assert!(!json.contains('<') && !json.contains('&'), "{json}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back["source"], data.source);
        assert_eq!(back["notes"][0], "a & b\u{2028}");
        let page = render(&data);
        assert_eq!(
            page.matches("</script>").count(),
            3,
            "only the page's own scripts close"
        );
        assert!(page.contains("&lt;/script&gt;"), "the title is escaped");
        assert!(
            !page.contains("src=\"http"),
            "nothing is loaded from elsewhere"
        );
    }
}
