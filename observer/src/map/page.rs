//! The map page: one HTML file with its scripts, styles and data inlined, so that it opens
//! from a file, a CI artifact or an air-gapped laptop without any network access.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::MapData;

/// Cytoscape.js, vendored unmodified (see `assets/README.md` and `assets/LICENSE-cytoscape`).
const CYTOSCAPE_JS: &str = include_str!("assets/cytoscape.min.js");
/// Version of `CYTOSCAPE_JS`.
pub const CYTOSCAPE_VERSION: &str = "3.34.4";
const MAP_JS: &str = include_str!("assets/map.js");
const MAP_CSS: &str = include_str!("assets/map.css");

// One literal for both policies, so that the served header can never allow what the page's
// own policy forbids.
macro_rules! page_csp {
    () => {
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'"
    };
}

/// The page's Content-Security-Policy (its `<meta>`): nothing loads from elsewhere, since the
/// page is data for an incident, possibly offline; only `--listen`'s `data.json` is fetched.
pub const PAGE_CSP: &str = page_csp!();

/// The policy `--listen` sends as a header: the page's, plus `frame-ancestors 'none'`, which
/// only a header can carry (no other site may frame the map).
pub const HEADER_CSP: &str = concat!(page_csp!(), "; frame-ancestors 'none'");

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
    let json = script_json(data);
    let title = format!("deny-observer traffic map: {}", escape_html(&data.source));
    let mut page = String::with_capacity(CYTOSCAPE_JS.len() + json.len() + 16 * 1024);
    page.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    page.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    page.push_str(&format!(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"{PAGE_CSP}\">\n"
    ));
    page.push_str(&format!("<title>{title}</title>\n<style>\n"));
    page.push_str(MAP_CSS);
    page.push_str("</style>\n</head>\n<body>\n");
    page.push_str(BODY);
    page.push_str("<script id=\"map-data\" type=\"application/json\">");
    page.push_str(&json);
    page.push_str("</script>\n<script>\n/* Cytoscape.js ");
    page.push_str(CYTOSCAPE_VERSION);
    page.push_str(", MIT licence (see the licence header below) */\n");
    page.push_str(CYTOSCAPE_JS);
    page.push_str("\n</script>\n<script>\n");
    page.push_str(MAP_JS);
    page.push_str("\n</script>\n</body>\n</html>\n");
    page
}

const BODY: &str = r#"<header>
  <h1>Traffic map</h1>
  <p id="source"></p>
  <div id="banner" role="alert" hidden></div>
  <form id="filters" aria-label="Filters" onsubmit="return false">
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
