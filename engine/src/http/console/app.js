// The sagaflow console: a page per hash route, each reading and acting through the JSON API.
// Every text from the server goes into the page as text (textContent), never as markup; the one
// exception is the graph, an SVG the engine renders with every text escaped.
'use strict';

// What went wrong in a script, for people (the console) and for the browser test.
window.__errors = [];
window.addEventListener('error', (e) => window.__errors.push(String(e.message)));
window.addEventListener('unhandledrejection', (e) => window.__errors.push(String(e.reason)));

const STATES = ['queued', 'running', 'compensating', 'completed', 'compensated', 'failed'];
const FINAL = ['completed', 'compensated'];
const ACTOR = 'console';

// ---- small helpers -------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let data = text;
  if ((r.headers.get('content-type') || '').includes('json')) {
    try { data = JSON.parse(text); } catch (_) { /* keep the text */ }
  }
  if (!r.ok) {
    const why = data && data.error ? data.error : `${r.status} ${r.statusText}`;
    const e = new Error(why);
    e.status = r.status;
    throw e;
  }
  return data;
}

function when(t) {
  if (!t) return '';
  const d = new Date(t);
  if (isNaN(d)) return t;
  return d.toLocaleString(undefined, { hour12: false });
}

function ago(t) {
  const s = Math.round((Date.now() - new Date(t).getTime()) / 1000);
  if (!isFinite(s)) return '';
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function ms(v) {
  if (v === null || v === undefined) return '–';
  return v < 1000 ? `${v} ms` : `${(v / 1000).toFixed(v < 10000 ? 2 : 1)} s`;
}

function badge(state, extra) {
  return el('span', { class: `badge ${state}`, 'data-state': state }, extra || state);
}

function toast(text, isError) {
  const t = document.getElementById('toast');
  t.textContent = text;
  t.className = isError ? 'error' : '';
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, isError ? 9000 : 4000);
}

function hashFor(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v) q.set(k, v);
  const s = q.toString();
  return `#${path}${s ? '?' + s : ''}`;
}

// ---- the confirmation dialog ---------------------------------------------------------------

// Opens the dialog: `fields` are [{name, label, value, required, kind: 'text'|'textarea'|'select',
// options}]; `run(values)` does the work and may throw (the error shows in the dialog, which
// stays open). Resolves to true when it ran.
function confirmAction({ title, body, fields, okLabel, run }) {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-title').textContent = title;
  const bodyEl = document.getElementById('confirm-body');
  bodyEl.replaceChildren(...[].concat(body).map((b) => (b instanceof Node ? b : el('p', {}, b))));
  const fieldsEl = document.getElementById('confirm-fields');
  const inputs = {};
  fieldsEl.replaceChildren(...(fields || []).map((f) => {
    let input;
    if (f.kind === 'textarea') input = el('textarea', { name: f.name }, f.value || '');
    else if (f.kind === 'select') {
      input = el('select', { name: f.name }, f.options.map(([v, l]) => el('option', { value: v }, l)));
      if (f.value) input.value = f.value;
    } else input = el('input', { type: 'text', name: f.name, value: f.value || '' });
    if (f.required) input.required = true;
    inputs[f.name] = input;
    return el('div', {}, el('label', { for: f.name }, f.label), input);
  }));
  const err = document.getElementById('confirm-error');
  err.hidden = true;
  const ok = document.getElementById('confirm-ok');
  ok.textContent = okLabel || 'Confirm';
  ok.disabled = false;
  return new Promise((resolve) => {
    const onClick = async (ev) => {
      ev.preventDefault();
      const values = {};
      for (const [k, input] of Object.entries(inputs)) {
        if (input.required && !input.value.trim()) {
          err.textContent = `${k} is required`;
          err.hidden = false;
          input.focus();
          return;
        }
        values[k] = input.value;
      }
      ok.disabled = true;
      try {
        await run(values);
        cleanup();
        dialog.close();
        resolve(true);
      } catch (e) {
        err.textContent = e.message;
        err.hidden = false;
        ok.disabled = false;
      }
    };
    const onClose = () => { cleanup(); resolve(false); };
    const cleanup = () => {
      ok.removeEventListener('click', onClick);
      dialog.removeEventListener('close', onClose);
    };
    ok.addEventListener('click', onClick);
    dialog.addEventListener('close', onClose);
    dialog.showModal();
  });
}

// ---- routing and live refresh --------------------------------------------------------------

let generation = 0; // bumped per page: a refresh of a page left behind does nothing
let timer = null;

function live(ok) {
  const l = document.getElementById('live');
  l.textContent = ok ? `live · ${new Date().toLocaleTimeString(undefined, { hour12: false })}` : 'offline: retrying';
  l.className = ok ? '' : 'stale';
}

// Runs `refresh` now and every `every` ms while this page is shown (and `keep()` says so).
function poll(refresh, every, keep) {
  const mine = generation;
  const tick = async () => {
    if (mine !== generation) return;
    try {
      await refresh(() => mine === generation);
      live(true);
    } catch (e) {
      if (mine !== generation) return;
      // A 404 is an answer (the page said so): no use asking again.
      if (e.status === 404) return;
      live(false);
    }
    if (mine === generation && (!keep || keep())) timer = setTimeout(tick, every);
  };
  return tick();
}

function route() {
  generation += 1;
  clearTimeout(timer);
  const [path, qs] = (location.hash || '#/sagas').slice(1).split('?');
  const params = Object.fromEntries(new URLSearchParams(qs || ''));
  const page = document.getElementById('page');
  let section = 'sagas';
  if (path.startsWith('/saga/')) {
    sagaPage(page, decodeURIComponent(path.slice('/saga/'.length)));
  } else if (path === '/dead-letters') {
    section = 'dead-letters';
    deadLettersPage(page, params);
  } else if (path === '/dashboard') {
    section = 'dashboard';
    dashboardPage(page, params);
  } else {
    sagasPage(page, params);
  }
  for (const a of document.querySelectorAll('header nav a')) {
    a.classList.toggle('current', a.dataset.nav === section);
  }
}

// ---- sagas: the list -----------------------------------------------------------------------

const BULK = {
  retry: {
    label: 'Retry', states: ['failed'],
    explain: 'Each failed saga resumes where it stopped: its failed step gets a fresh retry budget and is sent again.',
  },
  abort: {
    label: 'Abort', states: ['running', 'queued'],
    explain: 'Each saga stops going forward and compensates what it has done; a queued one ends compensated without running.',
    reason: true,
  },
  pause: {
    label: 'Pause', states: ['running', 'compensating'],
    explain: 'Nothing more is dispatched for each saga until it is resumed; replies still arrive and are recorded.',
    reason: true,
  },
  resume: {
    label: 'Resume', states: ['running', 'compensating'],
    explain: 'Each paused saga goes on: what its pause held back is dispatched now.',
  },
};

function listQuery(params, extra) {
  const q = new URLSearchParams();
  for (const k of ['state', 'saga', 'key', 'after']) if (params[k]) q.set(k, params[k]);
  for (const k of ['from', 'to']) if (params[k]) q.set(k, new Date(params[k]).toISOString());
  for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
  return q.toString();
}

async function sagasPage(page, params) {
  const chips = el('div', { class: 'chips', id: 'counts' });
  const defSelect = el('select', { name: 'saga' }, el('option', { value: '' }, 'any definition'));
  const form = el('form', { class: 'filters', id: 'filters' },
    el('label', {}, 'Search id or order key', el('input', { type: 'search', name: 'q', placeholder: 'saga id or key', value: '' })),
    el('label', {}, 'State', el('select', { name: 'state' }, el('option', { value: '' }, 'any state'), STATES.map((s) => el('option', { value: s }, s)))),
    el('label', {}, 'Definition', defSelect),
    el('label', {}, 'Order key', el('input', { type: 'text', name: 'key', value: params.key || '' })),
    el('label', {}, 'Created from', el('input', { type: 'datetime-local', name: 'from', value: params.from || '' })),
    el('label', {}, 'to', el('input', { type: 'datetime-local', name: 'to', value: params.to || '' })),
    el('button', { type: 'submit', class: 'primary' }, 'Apply'),
    el('a', { href: '#/sagas' }, 'clear'));
  form.elements.state.value = params.state || '';
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const f = form.elements;
    const q = f.q.value.trim();
    if (q) {
      try {
        await api('GET', `/sagas/${encodeURIComponent(q)}`);
        location.hash = `#/saga/${encodeURIComponent(q)}`;
        return;
      } catch (e) {
        if (e.status !== 404) { toast(e.message, true); return; }
        // Not a saga id: take it as an order key.
        f.key.value = q;
      }
    }
    location.hash = hashFor('/sagas', {
      state: f.state.value, saga: f.saga.value, key: f.key.value.trim(), from: f.from.value, to: f.to.value,
    });
  });

  const bulkSelect = el('select', { id: 'bulk-action' }, Object.entries(BULK).map(([k, b]) => el('option', { value: k }, `${b.label} all matching…`)));
  const bulk = el('div', { class: 'actions' }, bulkSelect,
    el('button', { id: 'bulk-go', type: 'button', onclick: () => bulkAction(bulkSelect.value, params) }, 'Go'));

  const tbody = el('tbody', { id: 'saga-rows' });
  const table = el('table', { id: 'sagas' },
    el('thead', {}, el('tr', {}, ['Saga', 'Definition', 'State', 'Order key', 'Created', 'Finished'].map((h) => el('th', {}, h)))),
    tbody);
  const pager = el('div', { class: 'pager' });
  page.replaceChildren(el('h1', {}, 'Sagas'), chips, form, bulk, table, pager);

  const refresh = async (current) => {
    const [stats, list] = await Promise.all([
      api('GET', '/stats?minutes=0'),
      api('GET', `/sagas?${listQuery(params, { limit: 50 })}`),
    ]);
    if (!current()) return;
    chips.replaceChildren(
      el('a', { class: `chip${params.state ? '' : ' current'}`, href: hashFor('/sagas', { ...params, state: '', after: '' }) }, 'all', el('b', {}, Object.values(stats.counts).reduce((a, b) => a + b, 0))),
      ...STATES.map((s) => el('a', { class: `chip${params.state === s ? ' current' : ''}`, href: hashFor('/sagas', { ...params, state: s, after: '' }), 'data-count': s },
        badge(s), el('b', {}, stats.counts[s] || 0))));
    if (defSelect.options.length === 1) {
      for (const d of stats.definitions) defSelect.append(el('option', { value: d }, d));
      defSelect.value = params.saga || '';
    }
    tbody.replaceChildren(...(list.sagas.length ? list.sagas.map((s) => el('tr', { 'data-id': s.id },
      el('td', { class: 'mono' }, el('a', { href: `#/saga/${encodeURIComponent(s.id)}` }, s.id)),
      el('td', {}, s.name),
      el('td', {}, badge(s.state)),
      el('td', { class: 'mono' }, el('a', { href: hashFor('/sagas', { key: s.sequence_key }) }, s.sequence_key)),
      el('td', { title: when(s.created_at) }, ago(s.created_at)),
      el('td', {}, s.finished_at ? when(s.finished_at) : ''))) : [el('tr', {}, el('td', { colspan: 6, class: 'muted' }, 'No saga matches.'))]));
    pager.replaceChildren(
      params.after ? el('a', { href: hashFor('/sagas', { ...params, after: '' }) }, '« newest') : '',
      list.next ? el('a', { id: 'next-page', href: hashFor('/sagas', { ...params, after: list.next }) }, 'next page »') : '',
      el('span', { class: 'muted' }, `${list.sagas.length} shown`));
  };
  poll(refresh, 3000);
}

// Every saga the list's filter matches (all pages).
async function allMatching(params) {
  const out = [];
  let after = '';
  for (;;) {
    const page = await api('GET', `/sagas?${listQuery({ ...params, after }, { limit: 1000 })}`);
    out.push(...page.sagas);
    if (!page.next || out.length >= 100000) return out;
    after = page.next;
  }
}

async function bulkAction(action, params) {
  const b = BULK[action];
  let matching;
  try {
    matching = await allMatching(params);
  } catch (e) { toast(e.message, true); return; }
  const eligible = matching.filter((s) => b.states.includes(s.state));
  const filter = [params.state && `state ${params.state}`, params.saga && `definition ${params.saga}`, params.key && `key ${params.key}`,
    params.from && `created from ${params.from}`, params.to && `created before ${params.to}`].filter(Boolean).join(', ') || 'no filter';
  const sample = eligible.slice(0, 8).map((s) => el('li', { class: 'mono' }, `${s.id} (${s.state}, ${s.sequence_key})`));
  if (eligible.length > 8) sample.push(el('li', { class: 'muted' }, `… and ${eligible.length - 8} more`));
  await confirmAction({
    title: `${b.label} ${eligible.length} saga${eligible.length === 1 ? '' : 's'}?`,
    body: [
      `The filter (${filter}) matches ${matching.length} saga${matching.length === 1 ? '' : 's'}; ${eligible.length} of them are ${b.states.join(' or ')} and will be asked to ${action}.`,
      b.explain,
      el('ul', {}, sample),
      'The engine may still refuse one (its state moved meanwhile); each refusal is reported.',
    ],
    fields: b.reason ? [{ name: 'reason', label: 'Reason (kept in each saga\'s history)', required: true }] : [],
    okLabel: `${b.label} ${eligible.length}`,
    run: async (v) => {
      let done = 0;
      const refused = [];
      for (const s of eligible) {
        try {
          await api('POST', `/sagas/${encodeURIComponent(s.id)}/${action}`, { actor: ACTOR, ...(b.reason ? { reason: v.reason } : {}) });
          done += 1;
        } catch (e) { refused.push(`${s.id}: ${e.message}`); }
      }
      toast(`${b.label}: ${done} done${refused.length ? `, ${refused.length} refused — ${refused.slice(0, 3).join('; ')}` : ''}`, refused.length > 0);
    },
  });
}

// ---- one saga ------------------------------------------------------------------------------

function operatorActions(d, reload) {
  const id = d.id;
  const post = (what, body) => api('POST', `/sagas/${encodeURIComponent(id)}/${what}`, { actor: ACTOR, ...body });
  const after = (what) => (ok) => { if (ok) { toast(`${what}: done`); reload(); } };
  const stuck = d.steps.filter((s) => s.state === 'failed' || s.state === 'stuck' || (s.last_error && s.state === 'active'));
  const buttons = [];
  if (d.state === 'failed') {
    buttons.push(el('button', { id: 'action-retry', onclick: () => confirmAction({
      title: `Retry saga ${id}?`,
      body: [`It resumes its ${d.compensating ? 'compensation' : 'forward run'} where it stopped: the failed step gets a fresh retry budget and is sent again.`,
        `Why it failed: ${d.reason}`],
      okLabel: 'Retry', run: () => post('retry', {}),
    }).then(after('retry')) }, 'Retry'));
    buttons.push(el('button', { id: 'action-skip', onclick: () => confirmAction({
      title: `Resolve a step of ${id} by hand?`,
      body: ['Use this when you have fixed the step\'s effect outside sagaflow. "done" marks the step as succeeded with the output you give (it must have every output the step declares); "compensated" marks it as having no effect, and the saga then compensates if the step was required. The saga then goes on.'],
      fields: [
        { name: 'step', label: 'Step', kind: 'select', options: (stuck.length ? stuck : d.steps).map((s) => [s.id, `${s.id} (${s.status})`]) },
        { name: 'as', label: 'Mark it as', kind: 'select', options: [['done', 'done (succeeded)'], ['compensated', 'compensated (no effect)']] },
        { name: 'output', label: 'Output (JSON, for done)', kind: 'textarea', value: '{}' },
        { name: 'reason', label: 'Reason (kept in the history)', required: true },
      ],
      okLabel: 'Resolve step',
      run: (v) => {
        const body = { step: v.step, as: v.as, reason: v.reason };
        if (v.as === 'done') {
          try { body.output = JSON.parse(v.output || '{}'); } catch (e) { throw new Error(`the output is not JSON: ${e.message}`); }
        }
        return post('skip', body);
      },
    }).then(after('skip')) }, 'Resolve step…'));
    buttons.push(el('button', { id: 'action-release-key', class: 'danger', onclick: () => confirmAction({
      title: `Release order key ${d.sequence_key}?`,
      body: ['The saga stays failed, and the next saga of this order starts now. Do this only once you have resolved this saga\'s effects by hand: two sagas of one order could otherwise act on it at once.',
        d.waiting && d.waiting.length ? `Waiting behind it: ${d.waiting.join(', ')}` : 'No saga waits behind it now.'],
      fields: [{ name: 'reason', label: 'Reason (kept in the history)', required: true }],
      okLabel: 'Release key', run: (v) => post('release-key', { reason: v.reason }),
    }).then(after('release key')) }, 'Release key…'));
  }
  if (d.state === 'running' || d.state === 'queued') {
    buttons.push(el('button', { id: 'action-abort', class: 'danger', onclick: () => confirmAction({
      title: `Abort saga ${id}?`,
      body: ['It stops going forward and compensates every step that took effect, in reverse order (steps past the pivot cannot be undone: then it finishes instead).'],
      fields: [{ name: 'reason', label: 'Reason (kept in the history)', required: true, value: 'aborted from the console' }],
      okLabel: 'Abort', run: (v) => post('abort', { reason: v.reason }),
    }).then(after('abort')) }, 'Abort…'));
  }
  if ((d.state === 'running' || d.state === 'compensating') && !d.paused) {
    buttons.push(el('button', { id: 'action-pause', onclick: () => confirmAction({
      title: `Pause saga ${id}?`,
      body: ['Nothing more is dispatched for it until it is resumed; replies to what was already sent are still recorded. A step that would be sent meanwhile waits as held.'],
      fields: [{ name: 'reason', label: 'Reason (kept in the history)', required: true }],
      okLabel: 'Pause', run: (v) => post('pause', { reason: v.reason }),
    }).then(after('pause')) }, 'Pause…'));
  }
  if (d.paused) {
    buttons.push(el('button', { id: 'action-resume', onclick: () => confirmAction({
      title: `Resume saga ${id}?`,
      body: [`Paused by ${d.paused.actor} since ${when(d.paused.since)}: ${d.paused.reason}.`, 'What the pause held back is dispatched now.'],
      okLabel: 'Resume', run: () => post('resume', {}),
    }).then(after('resume')) }, 'Resume'));
  }
  return buttons.length ? buttons : [el('span', { class: 'muted' }, 'No operator action applies to this state.')];
}

async function sagaPage(page, id) {
  const title = el('h1', {}, 'Saga ', el('span', { class: 'mono' }, id));
  const head = el('div', { class: 'card', id: 'saga-head' });
  const actions = el('div', { class: 'actions', id: 'saga-actions' });
  const graph = el('div', { class: 'graph', id: 'saga-graph' });
  const steps = el('tbody', { id: 'step-rows' });
  const io = el('div', { class: 'cols' });
  const timeline = el('tbody', { id: 'timeline-rows' });
  const omitted = el('p', { class: 'muted' });
  page.replaceChildren(title, head, actions, el('h2', {}, 'Step graph'), graph,
    el('h2', {}, 'Steps'),
    el('table', { id: 'steps' }, el('thead', {}, el('tr', {}, ['Step', 'Service', 'Kind', 'State', 'Attempts', 'Last error'].map((h) => el('th', {}, h)))), steps),
    io,
    el('h2', {}, 'Timeline'), omitted,
    el('table', { id: 'timeline' }, el('thead', {}, el('tr', {}, ['At', 'What', 'Step', 'Detail'].map((h) => el('th', {}, h)))), timeline));

  let state = null;
  let lastUpdated = null;
  const refresh = async (current) => {
    let d;
    try {
      d = await api('GET', `/sagas/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e.status === 404) {
        page.replaceChildren(el('h1', {}, 'No such saga'), el('p', {}, `There is no saga with id ${id}.`), el('a', { href: '#/sagas' }, 'back to the list'));
      }
      throw e;
    }
    if (!current()) return;
    state = d.state;
    if (d.updated_at === lastUpdated) return; // nothing changed
    lastUpdated = d.updated_at;
    const svg = d.definition_problem ? null : await api('GET', `/sagas/${encodeURIComponent(id)}/graph?format=svg`).catch(() => null);
    if (!current()) return;
    head.replaceChildren(
      el('div', { class: 'chips' }, badge(d.state, `${d.state}${d.compensating ? ' (compensating)' : ''}`), d.paused ? badge('paused', `paused by ${d.paused.actor}`) : ''),
      el('dl', { class: 'meta' },
        el('dt', {}, 'Definition'), el('dd', {}, `${d.name} v${d.version} `, el('span', { class: 'muted mono' }, d.definition_hash)),
        d.reason ? [el('dt', {}, 'Reason'), el('dd', { id: 'saga-reason' }, d.reason)] : [],
        d.paused ? [el('dt', {}, 'Paused'), el('dd', {}, `${d.paused.reason} (since ${when(d.paused.since)})`)] : [],
        el('dt', {}, 'Order key'), el('dd', { class: 'mono' }, el('a', { href: hashFor('/sagas', { key: d.sequence_key }) }, d.sequence_key)),
        d.waiting && d.waiting.length ? [el('dt', {}, 'Waiting behind it'), el('dd', {}, d.waiting.map((w) => el('a', { class: 'mono', href: `#/saga/${encodeURIComponent(w)}` }, w, ' ')))] : [],
        d.idempotency_key ? [el('dt', {}, 'Idempotency key'), el('dd', { class: 'mono' }, d.idempotency_key)] : [],
        el('dt', {}, 'Created'), el('dd', {}, when(d.created_at)),
        el('dt', {}, 'Updated'), el('dd', {}, when(d.updated_at)),
        el('dt', {}, 'Finished'), el('dd', {}, d.finished_at ? when(d.finished_at) : 'not yet'),
        d.definition_problem ? [el('dt', {}, 'Definition problem'), el('dd', { class: 'error' }, d.definition_problem)] : []));
    // After an action the next refresh redraws everything (the loop runs on: a saga with an
    // action to offer is not final).
    actions.replaceChildren(...operatorActions(d, () => { lastUpdated = null; }));
    if (svg) graph.innerHTML = svg; else graph.replaceChildren(el('p', { class: 'muted' }, d.definition_problem || 'The graph cannot be drawn.'));
    steps.replaceChildren(...d.steps.map((s) => el('tr', { 'data-step': s.id },
      el('td', { class: 'mono' }, s.id), el('td', {}, s.service || ''), el('td', {}, s.kind || ''),
      el('td', {}, badge(stepClass(s), s.status)), el('td', {}, s.attempts),
      el('td', { class: 'wrap' }, s.last_error || ''))));
    io.replaceChildren(
      el('div', {}, el('h2', {}, 'Input'), el('pre', { id: 'saga-input' }, JSON.stringify(d.input, null, 2))),
      el('div', {}, el('h2', {}, 'Step outputs'), el('pre', { id: 'saga-outputs' }, JSON.stringify(d.outputs || {}, null, 2))));
    omitted.textContent = d.timeline_omitted ? `${d.timeline_omitted} older entries are not shown.` : '';
    timeline.replaceChildren(...d.timeline.map((t) => el('tr', { 'data-kind': t.kind },
      el('td', { title: t.at }, when(t.at)), el('td', {}, t.kind), el('td', { class: 'mono' }, t.step || ''), el('td', { class: 'wrap' }, t.detail))));
  };
  // Live while it can still change by itself; a failed saga is looked at less often.
  poll(refresh, 1500, () => !FINAL.includes(state));
}

function stepClass(s) {
  switch (s.state) {
    case 'succeeded': case 'confirmed': return 'completed';
    case 'compensated': return 'compensated';
    case 'failed': case 'stuck': return 'failed';
    case 'active': return 'running';
    default: return 'queued';
  }
}

// ---- dead letters --------------------------------------------------------------------------

async function deadLettersPage(page, params) {
  const tbody = el('tbody', { id: 'dead-rows' });
  const detail = el('div', { id: 'dead-detail' });
  const pager = el('div', { class: 'pager' });
  const selected = new Set();
  const act = (what) => {
    const ids = [...selected];
    if (!ids.length) { toast('Select letters first (the boxes on the left).', true); return; }
    const replay = what === 'replay';
    confirmAction({
      title: `${replay ? 'Replay' : 'Purge'} ${ids.length} dead letter${ids.length === 1 ? '' : 's'}?`,
      body: [replay
        ? 'Each goes back on the queue it came from, through the outbox (it is delivered once the engine\'s relay sends it), and leaves this list. Fix what made it fail first, or it comes back here.'
        : 'They are deleted for good. Their messages are not delivered.',
      el('ul', {}, ids.slice(0, 10).map((i) => el('li', { class: 'mono' }, i)))],
      okLabel: replay ? 'Replay' : 'Purge',
      run: async () => {
        const r = await api('POST', `/dead-letters/${what}`, { ids });
        if (replay) {
          const failed = r.replayed.filter((x) => x.error);
          toast(`replayed ${r.replayed.length - failed.length}${failed.length ? `, ${failed.length} not: ${failed[0].error}` : ''}`, failed.length > 0);
        } else toast(`purged ${r.purged}`);
      },
    }).then((ok) => { if (ok) { selected.clear(); route(); } });
  };
  page.replaceChildren(el('h1', {}, 'Dead letters'),
    el('p', { class: 'muted' }, 'Messages no redelivery could mend: each with why, where it came from and when. Replay sends one back to its queue.'),
    el('div', { class: 'actions' },
      el('button', { id: 'dead-replay', onclick: () => act('replay') }, 'Replay selected…'),
      el('button', { id: 'dead-purge', class: 'danger', onclick: () => act('purge') }, 'Purge selected…')),
    el('table', { id: 'dead-letters' }, el('thead', {}, el('tr', {}, ['', 'Id', 'Queue', 'Reason', 'Set aside', 'Key'].map((h) => el('th', {}, h)))), tbody),
    pager, detail);
  const refresh = async (current) => {
    const q = new URLSearchParams({ limit: '100' });
    if (params.after) q.set('after', params.after);
    const r = await api('GET', `/dead-letters?${q}`);
    if (!current()) return;
    tbody.replaceChildren(...(r.dead_letters.length ? r.dead_letters.map((d) => el('tr', { 'data-id': d.id },
      el('td', {}, el('input', { type: 'checkbox', checked: selected.has(d.id), onchange: (ev) => { if (ev.target.checked) selected.add(d.id); else selected.delete(d.id); } })),
      el('td', { class: 'mono' }, el('a', { href: '#', onclick: (ev) => { ev.preventDefault(); showLetter(detail, d); } }, d.id)),
      el('td', { class: 'mono' }, d.queue), el('td', { class: 'wrap' }, d.reason),
      el('td', { title: d.dead_at }, when(d.dead_at)), el('td', { class: 'mono' }, d.message_key))) : [el('tr', {}, el('td', { colspan: 6, class: 'muted' }, 'No dead letters.'))]));
    pager.replaceChildren(
      params.after ? el('a', { href: '#/dead-letters' }, '« first') : '',
      r.next ? el('a', { href: hashFor('/dead-letters', { after: r.next }) }, 'next page »') : '');
  };
  poll(refresh, 5000);
}

function showLetter(detail, d) {
  let payload = d.payload;
  try { payload = JSON.stringify(JSON.parse(d.payload), null, 2); } catch (_) { /* not JSON */ }
  detail.replaceChildren(el('div', { class: 'card' },
    el('h2', {}, 'Dead letter ', el('span', { class: 'mono' }, d.id)),
    el('dl', { class: 'meta' },
      el('dt', {}, 'Reason'), el('dd', {}, d.reason),
      el('dt', {}, 'Queue'), el('dd', { class: 'mono' }, d.queue),
      el('dt', {}, 'Set aside'), el('dd', {}, when(d.dead_at)),
      el('dt', {}, 'Message id'), el('dd', { class: 'mono' }, d.message_id),
      el('dt', {}, 'Key'), el('dd', { class: 'mono' }, d.message_key)),
    el('h2', {}, 'Message'), el('pre', {}, payload)));
}

// ---- dashboard -----------------------------------------------------------------------------

const OUTCOMES = [['completed', '#3d9a50'], ['compensated', '#4a7fd4'], ['failed', '#d2452f']];

async function dashboardPage(page, params) {
  const minutes = params.minutes || '60';
  const figures = el('div', { class: 'figures', id: 'figures' });
  const chart = el('div', { class: 'card', id: 'chart' });
  const windowSelect = el('select', { onchange: (ev) => { location.hash = hashFor('/dashboard', { minutes: ev.target.value }); } },
    [['15', 'last 15 minutes'], ['60', 'last hour'], ['360', 'last 6 hours'], ['1440', 'last 24 hours']].map(([v, l]) => el('option', { value: v }, l)));
  windowSelect.value = minutes;
  page.replaceChildren(el('h1', {}, 'Dashboard'), el('div', { class: 'actions' }, windowSelect), figures, chart);
  const refresh = async (current) => {
    const s = await api('GET', `/stats?minutes=${encodeURIComponent(minutes)}`);
    if (!current()) return;
    const fig = (label, value, id) => el('div', { class: 'figure', id }, el('div', { class: 'value' }, value), el('div', { class: 'label' }, label));
    const started = s.minutes.reduce((a, m) => a + m.started, 0);
    const finished = (o) => s.minutes.reduce((a, m) => a + (m.finished[o] || 0), 0);
    figures.replaceChildren(
      fig('running now', (s.counts.running || 0) + (s.counts.compensating || 0), 'fig-running'),
      fig('failed, waiting for an operator', s.counts.failed || 0, 'fig-failed'),
      fig(`started in the window`, started, 'fig-started'),
      fig('completed / compensated in the window', `${finished('completed')} / ${finished('compensated')}`, 'fig-finished'),
      fig(`latency p50 (${s.latency.finished} final)`, ms(s.latency.p50_ms), 'fig-p50'),
      fig('latency p90', ms(s.latency.p90_ms), 'fig-p90'),
      fig('latency p99', ms(s.latency.p99_ms), 'fig-p99'),
      fig(`outbox: ${s.outbox.pending} unsent`, `lag ${ms(s.outbox.lag_ms)}`, 'fig-outbox'),
      fig('dead letters kept', s.dead_letters, 'fig-dead'));
    chart.replaceChildren(el('h2', {}, 'Per minute: started, and finished by outcome'),
      el('div', { class: 'legend' }, el('span', { class: 'lg-started' }, 'started'), OUTCOMES.map(([o]) => el('span', { class: `lg-${o}` }, o))),
      barChart(s, Number(minutes)));
  };
  poll(refresh, 5000);
}

// Two bars a minute: started (grey), finished stacked by outcome.
function barChart(s, minutes) {
  const ns = 'http://www.w3.org/2000/svg';
  const svgEl = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const width = 1100; const height = 230; const left = 44; const bottom = 24; const top = 10;
  const now = new Date(s.now).getTime();
  const first = Math.floor((now - minutes * 60000) / 60000) * 60000;
  const byMinute = new Map(s.minutes.map((m) => [new Date(m.at).getTime(), m]));
  const slots = [];
  for (let t = first; t <= now; t += 60000) slots.push(byMinute.get(t) || { at: t, started: 0, finished: {} });
  const total = (m) => OUTCOMES.reduce((a, [o]) => a + (m.finished[o] || 0), 0);
  const max = Math.max(1, ...slots.map((m) => Math.max(m.started, total(m))));
  const slot = (width - left) / slots.length;
  const bar = Math.max(1, slot / 2 - 1);
  const y = (v) => top + (height - bottom - top) * (1 - v / max);
  const svg = svgEl('svg', { viewBox: `0 0 ${width} ${height}`, width: '100%', class: 'chart', role: 'img' });
  for (const v of [0, max / 2, max]) {
    svg.append(svgEl('line', { x1: left, x2: width, y1: y(v), y2: y(v), stroke: '#e3e6ec' }));
    svg.append(svgEl('text', { x: left - 6, y: y(v) + 4, 'text-anchor': 'end', 'font-size': 11, fill: '#6b7280' }, Math.round(v)));
  }
  slots.forEach((m, i) => {
    const x = left + i * slot;
    const label = new Date(new Date(m.at).getTime()).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit', hour12: false });
    if (m.started) {
      const r = svgEl('rect', { x, y: y(m.started), width: bar, height: y(0) - y(m.started), fill: '#b8bec9' });
      r.append(svgEl('title', {}, `${label}: ${m.started} started`));
      svg.append(r);
    }
    let base = 0;
    for (const [o, c] of OUTCOMES) {
      const n = m.finished[o] || 0;
      if (!n) continue;
      const r = svgEl('rect', { x: x + bar + 1, y: y(base + n), width: bar, height: y(base) - y(base + n), fill: c });
      r.append(svgEl('title', {}, `${label}: ${n} ${o}`));
      svg.append(r);
      base += n;
    }
    if (i % Math.ceil(slots.length / 12) === 0) {
      svg.append(svgEl('text', { x, y: height - 6, 'font-size': 11, fill: '#6b7280' }, label));
    }
  });
  return svg;
}

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', route);
