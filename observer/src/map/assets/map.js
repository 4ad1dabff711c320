// deny-observer traffic map: draws the embedded (or served) map document with Cytoscape.js
// and keeps an accessible list of every workload and edge next to it.
(function () {
  'use strict';

  var $ = function (id) { return document.getElementById(id); };
  // Milliseconds since navigation start at each step of the last draw, for the benchmark.
  var phases = {};
  function mark(name) { phases[name] = Math.round(performance.now()); }
  mark('script');
  var data = JSON.parse($('map-data').textContent);
  mark('parsed');
  var cy = null;
  // Every dictionary keyed by names from the data is a Map: namespaces and workloads are
  // whatever the edges file or the metrics' labels say, and in a plain object `__proto__` never
  // becomes a key while `constructor` is one already.
  var ui = { ns: '*', deniedOnly: false, win: -1, aggregate: null, expanded: new Map(), selected: null };
  // The signature of what is drawn: a refresh that changes nothing drawn keeps the layout.
  var drawnSignature = '';
  // The edge list's rows, by edge index; rows per chunk (see map.css .chunk).
  var rowEls = [];
  var CHUNK = 250;

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c];
    });
  }
  function nsName(ns) { return ns === '' ? 'outside the cluster' : ns; }
  function nsOf(id) { return id.slice(0, id.indexOf('/')); }
  function edgeName(e) { return e.source + '->' + e.target; }
  // The explain answer: the page's data holds it as indexes into lines shared by all edges.
  function explainText(e) {
    if (typeof e.explain === 'string') { return e.explain; }
    var lines = data.explain_lines || [];
    return (e.explain || []).map(function (i) { return lines[i]; }).join('\n');
  }
  function hasPort(e) { return e.port !== null && e.port !== undefined; }
  // A denied edge shown once per port carries the edge's count over all its ports
  // (`count_ports`): the drop metrics count packets per edge, not per port.
  function shared(e) { return !!(e.count_ports && e.count_ports.length); }
  function portText(e) { return e.protocol + (hasPort(e) ? '/' + e.port : (shared(e) ? '/other' : '')); }
  function count(e) { return e.observed[ui.win] || 0; }
  function obsText(e) { return String(count(e)) + (shared(e) ? ' (edge)' : ''); }
  // Per second; an edges file has no window length, and its counts stand in for rates.
  function rate(e) {
    var secs = data.window_seconds[ui.win] || 0;
    return secs > 0 ? count(e) / secs : count(e);
  }
  function nsInfo(ns) {
    for (var i = 0; i < data.namespaces.length; i++) {
      if (data.namespaces[i].name === ns) { return data.namespaces[i]; }
    }
    return { name: ns, open: false, policies: 0, known: false };
  }

  // Which edges pass the filters (the list hides the others, the graph leaves them out).
  function visible(e) {
    if (count(e) <= 0) { return false; }
    if (ui.deniedOnly && e.verdict !== 'denied') { return false; }
    if (ui.ns !== '*' && nsOf(e.source) !== ui.ns && nsOf(e.target) !== ui.ns) { return false; }
    return true;
  }

  function fillFilters() {
    var nsSel = $('filter-namespace');
    var keep = nsSel.value;
    nsSel.length = 1;
    data.namespaces.forEach(function (n) {
      var o = document.createElement('option');
      o.value = n.name;
      o.textContent = nsName(n.name) + (n.open ? ' (open field)' : '');
      nsSel.appendChild(o);
    });
    nsSel.value = Array.prototype.some.call(nsSel.options, function (o) { return o.value === keep; }) ? keep : '*';
    ui.ns = nsSel.value;
    var winSel = $('filter-window');
    var keepWin = winSel.value;
    winSel.length = 0;
    data.windows.forEach(function (w, i) {
      var o = document.createElement('option');
      o.value = String(i);
      o.textContent = w;
      winSel.appendChild(o);
    });
    var last = String(data.windows.length - 1);
    winSel.value = keepWin !== '' && Number(keepWin) < data.windows.length ? keepWin : last;
    ui.win = Number(winSel.value);
  }

  function header() {
    var when = new Date(data.generated_unix * 1000).toISOString().replace('.000', '');
    var src = data.source ? data.source + ', ' + when : when;
    if (data.refresh_seconds) { src += ', refreshed every ' + data.refresh_seconds + ' s'; }
    $('source').textContent = src;
    var banner = $('banner');
    if (data.error) {
      banner.className = '';
      banner.textContent = data.error;
      banner.hidden = false;
    } else if (data.notes && data.notes.length) {
      banner.className = 'note';
      banner.textContent = data.notes.join(' · ');
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
  }

  // The accessible list: every workload and every edge, with the data attributes tools read.
  // Its 10,000 rows cost a third of a second of script and parsing: they are built after the
  // graph's first frame, a slice at a time between tasks so the page stays responsive, into a
  // detached element that replaces the old list at once (a refresh never shows it half built).
  // `listGen` drops the slices of a list a newer draw replaced.
  var listGen = 0;
  var LIST_SLICE = 2000;
  function edgeRow(e, i) {
    return '<tr' + (visible(e) ? '' : ' hidden') + ' data-idx="' + i + '" data-edge="' + esc(edgeName(e)) + '" data-verdict="' + e.verdict +
      '" data-protocol="' + esc(e.protocol) + '" data-port="' + (hasPort(e) ? e.port : '') +
      (shared(e) ? '" data-count-ports="' + esc(e.count_ports.join(',')) : '') +
      '" data-policy="' + esc(e.policy) + '" data-match="' + esc(e.match || '') +
      '" data-observed="' + count(e) + '"><td>' + esc(e.source) + '</td><td>' + esc(e.target) +
      '</td><td>' + e.verdict + (e.match === 'unexplained' ? ' (unexplained)' : '') + '</td><td>' +
      esc(portText(e)) + '</td><td class="obs">' + obsText(e) + '</td><td>' + esc(e.policy || '-') +
      '</td><td><button type="button" class="link" data-select="' + i + '">details</button></td></tr>';
  }
  // Chunks of CHUNK rows, each its own table with the same fixed columns (see .chunk).
  // Column widths are in map.css: the page's policy refuses inline style attributes.
  var LIST_HEAD = '<colgroup><col><col><col><col><col><col><col></colgroup>' +
    '<thead class="HEAD"><tr><th scope="col">Source</th><th scope="col">Destination</th><th scope="col">Verdict</th>' +
    '<th scope="col">Protocol/port</th><th scope="col">Observed</th><th scope="col">Policies</th><th scope="col"></th></tr></thead>';
  function chunkHtml(from) {
    var rows = [];
    var to = Math.min(from + CHUNK, data.edges.length);
    for (var i = from; i < to; i++) { rows.push(edgeRow(data.edges[i], i)); }
    return '<div class="chunk"><table>' + LIST_HEAD.replace('HEAD', from === 0 ? '' : 'sr-only') + '<tbody>' +
      rows.join('') + '</tbody></table></div>';
  }
  function buildList(done) {
    var gen = ++listGen;
    var holder = document.createElement('div');
    // The rows on screen may be of the previous data: filters leave them alone until the new
    // list replaces them.
    rowEls = [];
    ui.listBuilding = true;
    var next = 0;
    var n = data.edges.length;
    function slice() {
      if (gen !== listGen) { return; }
      var html = [];
      var end = Math.min(next + LIST_SLICE, n);
      do {
        html.push(chunkHtml(next));
        next += CHUNK;
      } while (next < end);
      holder.insertAdjacentHTML('beforeend', html.join(''));
      if (next < n) { setTimeout(slice, 0); return; }
      var items = [];
      data.nodes.forEach(function (nd) {
        var info = nsInfo(nd.namespace);
        items.push('<li data-workload="' + esc(nd.id) + '" data-namespace="' + esc(nd.namespace) +
          '" data-open="' + (info.open ? 'true' : 'false') + '" data-kind="' + esc(nd.kind || '') + '">' +
          esc(nd.namespace === '' ? nd.workload + ' (outside the cluster)' : nd.id) +
          (nd.kind ? ' <small>' + esc(nd.kind) + ', ' + nd.pods + ' pod(s)</small>' : '') + '</li>');
      });
      $('edge-list').replaceChildren.apply($('edge-list'), Array.prototype.slice.call(holder.childNodes));
      $('workload-list').innerHTML = items.join('');
      rowEls = $('edge-list').querySelectorAll('tr[data-idx]');
      // A filter changed while the slices were built: bring the early ones up to date.
      ui.listBuilding = false;
      if (ui.listStale) { applyListFilters(); }
      ui.listStale = false;
      done();
    }
    slice();
  }

  function applyListFilters() {
    var rows = rowEls;
    var shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var e = data.edges[i];
      var on = visible(e);
      rows[i].hidden = !on;
      rows[i].setAttribute('data-observed', String(count(e)));
      rows[i].cells[4].textContent = obsText(e);
      if (on) { shown++; }
    }
    return shown;
  }

  function widthFor(r, max) {
    if (r === null || max <= 0) { return 2; }
    return 1.5 + 8 * Math.log1p(r) / Math.log1p(max);
  }

  // Graph elements for the visible edges: every workload, or namespaces first when the map is
  // beyond the full-detail limits (a namespace expands on click).
  function elements(edges) {
    var nodeIds = new Set();
    edges.forEach(function (e) { nodeIds.add(e.source); nodeIds.add(e.target); });
    var ids = Array.from(nodeIds).sort();
    var aggregate = ui.aggregate;
    var endpoint = function (id) {
      var ns = nsOf(id);
      return aggregate && !ui.expanded.get(ns) ? 'ns:' + ns : id;
    };
    var els = [];
    var members = new Map();
    ids.forEach(function (id) {
      var ns = nsOf(id);
      members.set(ns, (members.get(ns) || 0) + 1);
    });
    // Namespace boxes are plain nodes drawn beneath their workloads, not Cytoscape compound
    // parents: with compound nodes every style property applied to any element re-dirties its
    // parents, descendants and their edges, which took seconds at 10,000 edges.
    Array.from(members.keys()).sort().forEach(function (ns) {
      var info = nsInfo(ns);
      var collapsed = aggregate && !ui.expanded.get(ns);
      els.push({ group: 'nodes', data: {
        id: 'ns:' + ns,
        label: nsName(ns) + (info.open ? ' (open field: no NetworkPolicy)' : '') + (collapsed ? ' [' + members.get(ns) + ' workloads]' : ''),
        ns: ns
      }, classes: 'namespace' + (info.open ? ' open' : '') + (collapsed ? ' collapsed' : '') + (ns === '' ? ' outside' : '') });
    });
    ids.forEach(function (id) {
      var ns = nsOf(id);
      if (aggregate && !ui.expanded.get(ns)) { return; }
      els.push({ group: 'nodes', data: { id: id, box: 'ns:' + ns, label: id.slice(ns.length + 1) }, classes: 'workload' });
    });
    var maxRate = 0;
    edges.forEach(function (e) { var r = rate(e); if (r !== null && r > maxRate) { maxRate = r; } });
    var merged = new Map();
    edges.forEach(function (e) {
      var at = e._idx;
      var s = endpoint(e.source), t = endpoint(e.target);
      var key = s + '|' + t + '|' + e.verdict + '|' + (e.verdict === 'denied' ? e.policy + '|' + (e.match || '') : '');
      var m = merged.get(key);
      if (!m) {
        m = { s: s, t: t, verdict: e.verdict, policy: e.policy, match: e.match, idx: [], count: 0, rate: null };
        merged.set(key, m);
      }
      m.idx.push(at);
      // The ports of one denied edge share its count: add it once.
      if (shared(e)) {
        var edgeKey = e.source + '>' + e.target + '|' + e.protocol;
        m.sharedSeen = m.sharedSeen || new Set();
        if (m.sharedSeen.has(edgeKey)) { return; }
        m.sharedSeen.add(edgeKey);
      }
      m.count += count(e);
      var r = rate(e);
      if (r !== null) { m.rate = (m.rate || 0) + r; }
    });
    Array.from(merged.keys()).sort().forEach(function (key, i) {
      var m = merged.get(key);
      var classes = m.verdict + (m.match === 'unexplained' ? ' unexplained' : '') + (m.s === m.t ? ' loop' : '');
      els.push({ group: 'edges', data: {
        id: 'e' + i, source: m.s, target: m.t, idx: m.idx.join(','),
        label: m.verdict === 'denied' ? (m.policy || (m.match === 'unexplained' ? 'unexplained' : 'denied')) : '',
        width: widthFor(m.rate, maxRate * (m.idx.length > 1 ? m.idx.length : 1))
      }, classes: classes });
    });
    return els;
  }

  // The drawing's style. Each property an element gets costs Cytoscape work per element before
  // the first frame, so a big map (`big`) sets only what it shows: straight (`haystack`, the
  // default) edges without arrows, opaque colours, and policy labels on denied edges once
  // zoomed in far enough to read them (class `named`, see render) or on the selected edge.
  function style(big) {
    var deniedLabel = { 'label': 'data(label)', 'font-size': 9, 'color': '#a01010', 'text-rotation': 'autorotate',
      'text-background-color': '#ffffff', 'text-background-opacity': 0.8, 'text-background-padding': 1,
      'min-zoomed-font-size': 7 };
    return [
      { selector: 'node.workload', style: {
        'label': 'data(label)', 'font-size': 10, 'text-valign': 'bottom', 'text-margin-y': 3,
        'width': 18, 'height': 18, 'background-color': '#4a6fa5', 'min-zoomed-font-size': 6 } },
      // Boxes are sized by the layout (data w, h) and drawn beneath everything else.
      { selector: 'node.namespace', style: {
        'label': 'data(label)', 'font-size': 12, 'font-weight': 'bold', 'text-valign': 'top', 'text-halign': 'center',
        'background-color': '#f2f5fa', 'background-opacity': 0.6, 'border-width': 1, 'border-color': '#9aa8bd',
        'shape': 'round-rectangle', 'width': 'data(w)', 'height': 'data(h)', 'z-compound-depth': 'bottom',
        'min-zoomed-font-size': 5 } },
      { selector: 'node.namespace.collapsed', style: { 'text-valign': 'center', 'text-wrap': 'wrap', 'text-max-width': 160, 'background-color': '#dbe4f1' } },
      { selector: 'node.namespace.open', style: { 'border-color': '#e08a00', 'border-style': 'dashed', 'border-width': 3, 'background-color': '#fff3e0', 'color': '#8a5300' } },
      { selector: 'node.namespace.outside', style: { 'background-color': '#eeeeee', 'border-style': 'dotted' } },
      { selector: 'edge', style: big ? { 'width': 'data(width)', 'line-color': '#559564' } : {
        'width': 'data(width)', 'curve-style': 'bezier', 'line-color': '#2b7a3d', 'opacity': 0.8,
        'target-arrow-shape': 'triangle', 'target-arrow-color': '#2b7a3d', 'arrow-scale': 0.8 } },
      // Denied edges are drawn over allowed ones.
      { selector: 'edge.denied', style: big ? { 'line-color': '#d62728', 'width': 2.5, 'z-index': 1 } :
        Object.assign({ 'line-color': '#d62728', 'target-arrow-color': '#d62728', 'width': 2.5, 'z-index': 1 }, deniedLabel) },
      { selector: 'edge.denied.named, edge.denied:selected', style: deniedLabel },
      { selector: 'edge.unexplained', style: { 'line-style': 'dashed' } },
      { selector: 'edge.loop', style: { 'curve-style': 'bezier', 'loop-direction': '0deg', 'loop-sweep': '50deg' } },
      { selector: ':selected', style: { 'overlay-color': '#1a56c4', 'overlay-opacity': 0.25 } }
    ];
  }

  // Lays out the map with Cytoscape's layouts, namespace by namespace: the boxes are placed by
  // Cytoscape's `breadthfirst` over the namespace graph (one node per box, sized like it,
  // linked where traffic crosses), so traffic flows from the top (clients, the outside) down
  // to the services it reaches. Where that gives a strip (densely linked namespaces) or there
  // are hundreds of namespaces, Cytoscape's `grid` places the boxes instead. Sets each box
  // element's position and size (data w, h) and returns the boxes for placeWorkloads.
  function planBoxes(els) {
    var boxes = [];
    var byId = new Map();
    els.forEach(function (el) {
      if (el.group === 'nodes' && !el.data.box) {
        var b = { id: el.data.id, el: el, n: 0 };
        boxes.push(b);
        byId.set(b.id, b);
      }
    });
    var links = new Map();
    els.forEach(function (el) {
      if (el.group === 'nodes' && el.data.box) {
        var box = byId.get(el.data.box);
        if (box) { box.n++; }
      }
      if (el.group !== 'edges') { return; }
      var s = el.data.source, t = el.data.target;
      var sb = byId.has(s) ? s : 'ns:' + nsOf(s), tb = byId.has(t) ? t : 'ns:' + nsOf(t);
      if (sb !== tb) { links.set(sb + '|' + tb, [sb, tb]); }
    });
    boxes.forEach(function (b) {
      b.cols = Math.max(1, Math.ceil(Math.sqrt(b.n * 1.6)));
      var rows = Math.max(1, Math.ceil(b.n / b.cols));
      b.w = b.n ? b.cols * 80 : 60;
      b.h = b.n ? rows * 56 : 40;
    });
    var planEls = boxes.map(function (b) { return { data: { id: b.id, w: b.w + 50, h: b.h + 60 } }; });
    Array.from(links.values()).forEach(function (link, i) {
      planEls.push({ data: { id: 'l' + i, source: link[0], target: link[1] } });
    });
    var plan = cytoscape({ headless: true, styleEnabled: true, elements: planEls,
      style: [{ selector: 'node', style: { width: 'data(w)', height: 'data(h)' } }] });
    var extent = function () {
      var bb = plan.nodes().boundingBox();
      return bb.w / Math.max(bb.h, 1);
    };
    var grid = function () {
      plan.layout({ name: 'grid', avoidOverlap: true, avoidOverlapPadding: 30, condense: true,
        animate: false, padding: 10, sort: function (a, c) { return a.id() < c.id() ? -1 : 1; } }).run();
    };
    if (boxes.length > 1 && boxes.length <= 300) {
      plan.layout({ name: 'breadthfirst', directed: true, avoidOverlap: true, spacingFactor: 1.05,
        animate: false, padding: 10 }).run();
      // Densely linked namespaces all land on one level: a strip nobody can read.
      var ratio = extent();
      if (ratio > 4 || ratio < 0.25) { grid(); }
    } else {
      grid();
    }
    plan.nodes().forEach(function (n) {
      var b = byId.get(n.id());
      var p = n.position();
      b.x1 = p.x - b.w / 2;
      b.y1 = p.y - b.h / 2;
      b.el.data.w = b.w;
      b.el.data.h = b.h;
      b.el.position = { x: p.x, y: p.y };
    });
    plan.destroy();
    return boxes;
  }

  // Places the workloads of each box with Cytoscape's `grid`, most connected first.
  function placeWorkloads(boxes, els) {
    var degree = new Map();
    els.forEach(function (el) {
      if (el.group !== 'edges') { return; }
      degree.set(el.data.source, (degree.get(el.data.source) || 0) + 1);
      degree.set(el.data.target, (degree.get(el.data.target) || 0) + 1);
    });
    var byBox = new Map();
    cy.nodes('.workload').forEach(function (w) {
      var box = w.data('box');
      if (!byBox.has(box)) { byBox.set(box, []); }
      byBox.get(box).push(w);
    });
    boxes.forEach(function (b) {
      if (!byBox.has(b.id)) { return; }
      cy.collection(byBox.get(b.id)).layout({ name: 'grid', animate: false, fit: false, avoidOverlap: false,
        condense: false, boundingBox: { x1: b.x1, y1: b.y1, w: b.w, h: b.h }, cols: b.cols,
        sort: function (a, c) {
          var da = degree.get(a.id()) || 0, dc = degree.get(c.id()) || 0;
          return da === dc ? (a.id() < c.id() ? -1 : 1) : dc - da;
        }
      }).run();
    });
  }

  // A namespace box is not a compound parent: dragging it takes its workloads along.
  function dragWithBox(evt) {
    var box = evt.target;
    var now = box.position();
    var last = box.scratch('_lastPos') || now;
    var dx = now.x - last.x, dy = now.y - last.y;
    box.scratch('_lastPos', { x: now.x, y: now.y });
    if (!dx && !dy) { return; }
    cy.batch(function () {
      cy.nodes('.workload').filter(function (w) { return w.data('box') === box.id(); }).shift({ x: dx, y: dy });
    });
  }

  // Fits the view to the boxes and workloads from their positions and sizes. Cytoscape's own
  // fit measures every element's bounds, labels included, which costs seconds with 10,000 edges.
  function fit() {
    var x1 = Infinity, y1 = Infinity, x2 = -Infinity, y2 = -Infinity;
    cy.nodes().forEach(function (n) {
      var p = n.position();
      var hw = n.hasClass('namespace') ? (n.data('w') || 0) / 2 : 9;
      var hh = n.hasClass('namespace') ? (n.data('h') || 0) / 2 : 9;
      x1 = Math.min(x1, p.x - hw); y1 = Math.min(y1, p.y - hh); x2 = Math.max(x2, p.x + hw); y2 = Math.max(y2, p.y + hh);
    });
    if (x1 === Infinity) { return; }
    // Room for the box titles above and the outermost labels.
    x1 -= 40; x2 += 40; y1 -= 40; y2 += 30;
    var w = cy.width(), h = cy.height();
    var zoom = Math.min(w / (x2 - x1), h / (y2 - y1), 2);
    zoom = Math.max(zoom, cy.minZoom());
    cy.viewport({ zoom: zoom, pan: { x: (w - zoom * (x1 + x2)) / 2, y: (h - zoom * (y1 + y2)) / 2 } });
  }

  function render() {
    var edges = data.edges.filter(visible);
    data.edges.forEach(function (e, i) { e._idx = i; });
    var nWorkloads = new Set();
    edges.forEach(function (e) { nWorkloads.add(e.source); nWorkloads.add(e.target); });
    var nodes = nWorkloads.size;
    var over = nodes > data.full_detail_max_workloads || edges.length > data.full_detail_max_edges;
    if (ui.aggregate === null || ui.autoAggregate !== over) {
      ui.aggregate = over;
      ui.autoAggregate = over;
      $('filter-aggregate').checked = over;
    }
    var els = elements(edges);
    var signature = els.map(function (el) { return el.data.id + ':' + (el.data.source || '') + '>' + (el.data.target || '') + ':' + (el.classes || ''); }).join('\n');
    var big = els.length > 3000;
    if (signature === drawnSignature && cy) {
      // Same drawing: update widths and labels only, keep positions.
      cy.batch(function () {
        els.forEach(function (el) {
          var c = cy.getElementById(el.data.id);
          if (c.nonempty()) { c.data(el.data); }
        });
      });
    } else {
      drawnSignature = signature;
      if (cy) { cy.destroy(); }
      mark('elements');
      cy = cytoscape({
        container: $('graph'), style: style(big), layout: { name: 'preset' },
        minZoom: 0.02, maxZoom: 4,
        textureOnViewport: big, hideEdgesOnViewport: big, pixelRatio: big ? 1 : 'auto'
      });
      var boxes = planBoxes(els);
      // Nodes first, placed and styled while they have no edges: Cytoscape re-dirties every
      // connected edge for each style property a node gets, which costs seconds with
      // 10,000 edges present.
      cy.startBatch();
      cy.add(els.filter(function (el) { return el.group === 'nodes'; }));
      placeWorkloads(boxes, els);
      cy.endBatch();
      mark('layout');
      cy.nodes().forEach(function (n) { n.numericStyle('width'); });
      cy.startBatch();
      cy.add(els.filter(function (el) { return el.group === 'edges'; }));
      cy.endBatch();
      mark('graph');
      fit();
      if (big) {
        // Policy labels on thousands of denied edges cost seconds before the first frame and
        // are unreadable at the fitted zoom: they are styled once the view is zoomed in.
        var named = false;
        cy.on('zoom', function () {
          if (named || cy.zoom() < 0.5) { return; }
          named = true;
          cy.edges('.denied').addClass('named');
        });
      }
      cy.on('grab', 'node.namespace', function (evt) {
        var p = evt.target.position();
        evt.target.scratch('_lastPos', { x: p.x, y: p.y });
      });
      cy.on('drag', 'node.namespace', dragWithBox);
      cy.on('tap', 'edge', function (evt) { select(evt.target.data('idx').split(',').map(Number)); });
      cy.on('tap', 'node.namespace', function (evt) {
        if (!ui.aggregate) { return; }
        var ns = evt.target.data('ns');
        ui.expanded.set(ns, !ui.expanded.get(ns));
        refilter();
      });
    }
    ui.drawnWorkloads = nodes;
    ui.shownEdges = edges.length;
    return cy;
  }

  function counts() {
    $('counts').textContent = ui.drawnWorkloads + ' workloads, ' + ui.shownEdges + ' of ' + data.edges.length +
      ' edges shown' + (ui.aggregate ? ' (by namespace: select one to expand it)' : '') +
      (data.edges_left_out ? '; ' + data.edges_left_out + ' lighter edges left out (--max-edges)' : '');
  }

  // After a filter change: redraw, then update the list in place.
  function refilter() {
    render();
    ui.listStale = !!ui.listBuilding;
    applyListFilters();
    counts();
  }

  function select(indexes) {
    var rows = rowEls;
    for (var i = 0; i < rows.length; i++) { rows[i].classList.remove('selected'); }
    var box = $('details');
    if (!indexes.length) { return; }
    ui.selected = indexes.map(function (i) { return edgeName(data.edges[i]) + '|' + portText(data.edges[i]) + '|' + data.edges[i].verdict; });
    var html = [];
    if (indexes.length > 1) {
      html.push('<h2>' + indexes.length + ' edges</h2><p class="hint">Between these namespaces or workloads; select one below.</p><ul>');
      indexes.slice(0, 200).forEach(function (i) {
        var e = data.edges[i];
        html.push('<li><button type="button" class="link" data-select="' + i + '">' + esc(edgeName(e)) + ' ' + esc(portText(e)) + ' ' + e.verdict + '</button> ' + count(e) + '</li>');
      });
      html.push('</ul>');
      box.innerHTML = html.join('');
      return;
    }
    var e = data.edges[indexes[0]];
    if (rows[indexes[0]]) { rows[indexes[0]].classList.add('selected'); }
    if (cy) {
      var want = String(indexes[0]);
      cy.edges(':selected').unselect();
      cy.edges().filter(function (el) { return el.data('idx').split(',').indexOf(want) >= 0; }).select();
    }
    html.push('<h2>' + esc(e.source) + ' &rarr; ' + esc(e.target) + '</h2>');
    html.push('<table><tr><th>verdict</th><td>' + e.verdict + (e.match ? ' (' + esc(e.match) + ')' : '') + '</td></tr>');
    var portNote = '';
    if (!hasPort(e)) {
      portNote = shared(e) ? ' (ports the daemon does not name: beyond 16 per edge, or a header cut short)' :
        ' (the drop metrics carry no port, and no new-edge series names one)';
    }
    html.push('<tr><th>protocol/port</th><td>' + esc(portText(e)) + portNote + '</td></tr>');
    if (shared(e)) {
      html.push('<tr><th>ports of the edge</th><td>' + esc(e.count_ports.join(', ')) +
        '<br><small>The counts below are the edge\'s, over all these ports: the drop metrics count packets per edge, not per port.</small></td></tr>');
    }
    html.push('<tr><th>policies</th><td>' + esc(e.policy || '-') + '</td></tr>');
    html.push('<tr><th>engine today</th><td>' + esc(e.judged) + '</td></tr>');
    data.windows.forEach(function (w, i) {
      var secs = data.window_seconds[i];
      var n = e.observed[i] || 0;
      html.push('<tr><th>' + (e.verdict === 'denied' ? 'dropped packets' + (shared(e) ? ' (edge, all ports)' : '') : 'connections') + ', ' + esc(w) + '</th><td>' + n +
        (secs > 0 ? ' (' + (n / secs).toPrecision(3) + '/s)' : '') + '</td></tr>');
    });
    html.push('</table><h3>explain</h3><pre>' + esc(explainText(e)) + '</pre>');
    box.innerHTML = html.join('');
  }

  function reselect() {
    if (!ui.selected) { return; }
    var want = ui.selected;
    var found = [];
    data.edges.forEach(function (e, i) {
      if (want.indexOf(edgeName(e) + '|' + portText(e) + '|' + e.verdict) >= 0) { found.push(i); }
    });
    if (found.length) { select(found); }
  }

  function onClickSelect(evt) {
    var t = evt.target;
    if (t && t.getAttribute && t.getAttribute('data-select') !== null) {
      select([Number(t.getAttribute('data-select'))]);
    }
  }

  // `#edge=<src_ns>/<src_workload>-><dst_ns>/<dst_workload>` selects that edge (a link to
  // one edge from a ticket or a page); its denied entry first.
  function selectFromHash() {
    var m = /^#edge=(.+)$/.exec(location.hash);
    if (!m) { return false; }
    var name;
    // A link cut short or mistyped (`%E0%A4%A`) is ignored: it must not stop the page.
    try { name = decodeURIComponent(m[1]); } catch (err) { return false; }
    var found = [];
    data.edges.forEach(function (e, i) { if (edgeName(e) === name) { found.push(i); } });
    found.sort(function (a, b) { return (data.edges[a].verdict === 'denied' ? 0 : 1) - (data.edges[b].verdict === 'denied' ? 0 : 1); });
    if (found.length) { select([found[0]]); }
    return found.length > 0;
  }

  // Draws the graph, then (after `before`, if given) the list; `after` once both are done.
  function draw(before, after) {
    header();
    fillFilters();
    // The graph first: the list's 10,000 rows would otherwise be laid out again every time
    // Cytoscape measures its container.
    render();
    mark('graph-done');
    counts();
    var list = function () {
      buildList(function () {
        mark('list');
        document.body.setAttribute('data-phases', JSON.stringify(phases));
        if (!ui.selected) { selectFromHash(); } else { reselect(); }
        if (after) { after(); }
      });
    };
    if (before) { before(list); } else { list(); }
  }

  // The first draw: the time from navigation start to the graph's first painted frame
  // (`data-render-ms`) and to the complete list (`data-list-ms`), which the scale benchmark
  // reads; `data-ready` once both are there.
  function firstDraw() {
    draw(function (list) {
      requestAnimationFrame(function () {
        requestAnimationFrame(function () {
          mark('painted');
          document.body.setAttribute('data-render-ms', String(phases.painted));
          setTimeout(list, 0);
        });
      });
    }, function () {
      document.body.setAttribute('data-list-ms', String(phases.list));
      document.body.setAttribute('data-ready', 'true');
    });
  }

  $('filter-namespace').addEventListener('change', function (e) { ui.ns = e.target.value; refilter(); });
  $('filter-denied').addEventListener('change', function (e) { ui.deniedOnly = e.target.checked; refilter(); });
  $('filter-window').addEventListener('change', function (e) { ui.win = Number(e.target.value); refilter(); });
  $('filter-aggregate').addEventListener('change', function (e) {
    ui.aggregate = e.target.checked;
    ui.expanded = new Map();
    refilter();
  });
  // The filters are a form for its semantics only: nothing is submitted (the policy's
  // `form-action 'none'` would refuse it anyway), and no inline handler may say so.
  $('filters').addEventListener('submit', function (e) { e.preventDefault(); });
  $('details').addEventListener('click', onClickSelect);
  $('edge-list').addEventListener('click', onClickSelect);

  // What is drawn, for tests and the render benchmark (the list shows what the data holds).
  window.trafficMap = {
    phases: function () { return phases; },
    drawn: function () {
      return cy ? { workloads: cy.nodes('.workload').length, namespaces: cy.nodes('.namespace').length,
        edges: cy.edges().length, aggregated: !!ui.aggregate } : null;
    }
  };

  firstDraw();

  // The delay to the next poll: `refresh_seconds`, within the server's bounds. Browsers keep a
  // timer's delay in a signed 32-bit count of milliseconds; beyond 2^31 ms (24.8 days) it
  // wraps to 0, and the page would poll without pause.
  function pollDelay() {
    var secs = Number(data.refresh_seconds);
    if (!(secs > 0)) { secs = 5; }
    return Math.min(Math.max(secs, 0.5), 3600) * 1000;
  }

  if (data.refresh_seconds) {
    var poll = function () {
      fetch('data.json', { cache: 'no-store' }).then(function (r) {
        if (!r.ok) { throw new Error('data.json: HTTP ' + r.status); }
        return r.json();
      }).then(function (next) {
        data = next;
        draw(null, function () { document.body.setAttribute('data-refreshed', String(data.generated_unix)); });
      }).catch(function (err) {
        var banner = $('banner');
        banner.className = '';
        banner.textContent = 'refresh failed: ' + err.message + ' (showing the last map)';
        banner.hidden = false;
      }).then(function () { setTimeout(poll, pollDelay()); });
    };
    setTimeout(poll, pollDelay());
  }
})();
