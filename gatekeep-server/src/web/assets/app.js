// gatekeep console. No framework, no third-party code; bundled into the service binary.
//
// Safety rule: every string from the service may come from the gated workload (argv, env,
// cwd, comm, cgroup, host names...). The DOM is built with createElement/textContent only,
// never by parsing HTML, and control, bidi and other invisible characters are shown as
// escapes (see `visible`), so nothing a workload writes can inject markup or disguise text.
'use strict';

const state = {
  session: null,        // {reviewer, groups, csrf_token, expires_at}
  auth: null,           // {token_sign_in, oidc}
  pending: new Map(),   // id -> queue row (see `requests` in startEvents)
  events: null,         // EventSource
  selected: 0,          // index in the visible queue
  filters: { host: '', policy: '', kind: '' },
  route: '',
  renderQueued: false,
  gPressed: false,
  renderSeq: 0,         // bumped by every route(); a slower, older render gives way
};

// ---------------------------------------------------------------- DOM helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, '');
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Characters a reviewer could not see or that reorder text: C0/C1 controls, DEL, bidi
// controls, zero-width and other format characters, line/paragraph separators.
const INVISIBLE = /[\u0000-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]/g;

function hex(code, width) {
  return code.toString(16).padStart(width, '0');
}

function escapeChar(ch) {
  const code = ch.codePointAt(0);
  const named = { '\n': '\\n', '\t': '\\t', '\r': '\\r', '\u001b': '\\e' }[ch];
  if (named) return named;
  return code < 0x100 ? '\\x' + hex(code, 2) : '\\u' + hex(code, 4);
}

// A workload-controlled string as a node: visible characters as text, the others as
// highlighted escapes (e.g. \e for ESC, \u202e for RIGHT-TO-LEFT OVERRIDE).
function visible(text) {
  const span = el('span', { class: 'mono' });
  if (text === undefined || text === null) {
    span.append(el('span', { class: 'muted' }, '(none)'));
    return span;
  }
  text = String(text);
  let last = 0;
  for (const match of text.matchAll(INVISIBLE)) {
    if (match.index > last) span.append(text.slice(last, match.index));
    span.append(el('span', { class: 'esc', title: 'escaped character' }, escapeChar(match[0])));
    last = match.index + match[0].length;
  }
  if (last < text.length) span.append(text.slice(last));
  return span;
}

// One argument as a POSIX shell word that means exactly it: bare when safe, '...' when
// printable, $'...' (with \xHH escapes) when it holds anything invisible.
function shellWord(arg) {
  if (arg !== '' && /^[A-Za-z0-9_@%+=:,./-]+$/.test(arg)) return arg;
  INVISIBLE.lastIndex = 0;
  if (!/[\u0000-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]/.test(arg)) {
    return "'" + arg.replace(/'/g, "'\\''") + "'";
  }
  let out = "$'";
  for (const ch of arg) {
    if (ch === '\\' || ch === "'") out += '\\' + ch;
    else if (ch.match(INVISIBLE)) out += escapeChar(ch).replace('\\e', '\\x1b');
    else out += ch;
  }
  return out + "'";
}

function shellLine(argv) {
  return argv.map(shellWord).join(' ');
}

function notice(message, isError) {
  const box = document.getElementById('notice');
  const line = el('p', { class: isError ? 'error' : '' }, message);
  box.append(line);
  setTimeout(() => line.remove(), isError ? 8000 : 4000);
}

// The shortest prefixes (at least 8 hex digits) telling the ids apart: sorted, each id
// needs one digit more than it shares with either neighbour.
function shortIds(ids) {
  const hexIds = ids.map((id) => id.replace(/-/g, ''));
  const order = hexIds.map((_, index) => index).sort((a, b) => (hexIds[a] < hexIds[b] ? -1 : 1));
  const common = (a, b) => { let n = 0; while (n < a.length && a[n] === b[n]) n += 1; return n; };
  const out = new Array(ids.length);
  order.forEach((index, position) => {
    const own = hexIds[index];
    const before = position > 0 ? common(own, hexIds[order[position - 1]]) : 0;
    const after = position + 1 < order.length ? common(own, hexIds[order[position + 1]]) : 0;
    out[index] = own.slice(0, Math.max(8, Math.max(before, after) + 1));
  });
  return out;
}

function timeLeft(deadline) {
  const ms = Date.parse(deadline) - Date.now();
  if (ms <= 0) return { text: 'due', late: true };
  const s = Math.floor(ms / 1000);
  const text = s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`
    : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
  return { text, late: s < 60 };
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : '';
}

// ---------------------------------------------------------------- API

async function api(method, path, body) {
  const headers = { accept: 'application/json' };
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (method !== 'GET' && state.session) headers['x-csrf-token'] = state.session.csrf_token;
  const response = await fetch('/api/v1' + path, {
    method, headers, credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    const message = data && data.error ? data.error.message : `${response.status} ${response.statusText}`;
    const error = new Error(message);
    error.status = response.status;
    if (response.status === 401) signedOut(message);
    throw error;
  }
  return data;
}

// ---------------------------------------------------------------- what a request asks

// A request's or a queue row's target (a row's may be `cut`: the rest is in the detail).
function whatOf(request) {
  const target = request.target;
  const more = target.cut ? ' …(more in the detail)' : '';
  if (target.kind === 'exec') {
    // WHAT is the argv; the executable is its own column, so argv[0] is not repeated when
    // it names the executable.
    const argv = target.argv || [];
    const rest = argv.length && (argv[0] === target.executable || target.executable.endsWith('/' + argv[0]))
      ? argv.slice(1) : argv;
    return { exe: target.executable, args: shellLine(rest) + more + (target.argv_truncated ? ' …(truncated)' : '') };
  }
  const dest = target.family === 'inet6' ? `[${target.address}]:${target.port}`
    : target.family === 'unix' ? target.address : `${target.address}:${target.port}`;
  const names = (target.resolved || []).length ? ` (${target.resolved.join(', ')}${more})` : '';
  return { exe: `connect ${target.socket_type || ''}`.trim(), args: dest + names };
}

// ---------------------------------------------------------------- sign-in

function signedOut(message) {
  state.session = null;
  if (state.events) { state.events.close(); state.events = null; }
  document.getElementById('nav').hidden = true;
  document.getElementById('sign-out').hidden = true;
  document.getElementById('who').textContent = '';
  renderSignIn(message);
}

function renderSignIn(message) {
  const main = document.getElementById('main');
  const form = el('form', { class: 'signin', id: 'signin-form' },
    el('h1', {}, 'Sign in'),
    message ? el('p', { class: 'why-not', role: 'alert' }, message) : null,
  );
  if (state.auth && state.auth.oidc) {
    form.append(el('a', { href: '/auth/oidc/login', id: 'oidc-sign-in', class: 'button primary' }, `Sign in with ${state.auth.oidc}`));
  }
  if (!state.auth || state.auth.token_sign_in) {
    const input = el('input', { type: 'password', id: 'token', name: 'token', autocomplete: 'off', required: true });
    form.append(
      el('label', { for: 'token' }, 'Reviewer token', input),
      el('button', { type: 'submit', class: state.auth && state.auth.oidc ? '' : 'primary' }, 'Sign in with token'),
    );
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      try {
        state.session = await api('POST', '/session', { token: input.value });
        input.value = '';
        signedIn();
      } catch (error) {
        renderSignIn(error.message);
      }
    });
  }
  main.replaceChildren(form);
  const first = form.querySelector('input, a');
  if (first) first.focus();
}

function signedIn() {
  document.getElementById('nav').hidden = false;
  const signOut = document.getElementById('sign-out');
  signOut.hidden = false;
  document.getElementById('who').textContent = `${state.session.reviewer} (${state.session.groups.join(', ') || 'no groups'})`;
  startEvents();
  route();
}

async function signOut() {
  try { await api('DELETE', '/session'); } catch (_) { /* signed out either way */ }
  signedOut('Signed out.');
}

// ---------------------------------------------------------------- live queue

function startEvents() {
  if (state.events) state.events.close();
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(state.filters)) if (value) params.set(key, value);
  const source = new EventSource('/api/v1/events?' + params.toString());
  state.events = source;
  // The snapshot of pending requests is drawn once, at `ready`; changes after it at once.
  state.snapshot = true;
  source.addEventListener('open', () => { state.pending.clear(); state.snapshot = true; });
  source.addEventListener('ready', () => { state.snapshot = false; scheduleRender(); });
  // `requests`: requests in the queue, as queue rows (what the queue shows; the detail
  // fetches the whole record); `left`: ids of requests that left it.
  const changed = (ids) => {
    if (state.snapshot) return;
    scheduleRender();
    if (state.route.startsWith('#/request/') && ids.some((id) => state.route.endsWith(id))) route();
  };
  source.addEventListener('requests', (event) => {
    const ids = [];
    for (const { row } of JSON.parse(event.data)) {
      if (row.state === 'pending') state.pending.set(row.id, row);
      else state.pending.delete(row.id);
      ids.push(row.id);
    }
    changed(ids);
  });
  source.addEventListener('left', (event) => {
    const ids = JSON.parse(event.data).map(({ id }) => id);
    for (const id of ids) state.pending.delete(id);
    changed(ids);
  });
  source.addEventListener('end', (event) => notice(event.data, true));
  source.addEventListener('error', async () => {
    if (source.readyState === EventSource.CLOSED) {
      // Refused (the session ended?): ask who we are, then reconnect.
      try { await api('GET', '/session'); setTimeout(startEvents, 1000); } catch (_) { /* signed out */ }
    }
  });
}

function scheduleRender() {
  document.getElementById('pending-count').textContent = `(${state.pending.size})`;
  if (state.renderQueued || state.route !== '#/queue') return;
  state.renderQueued = true;
  requestAnimationFrame(() => { state.renderQueued = false; if (state.route === '#/queue') renderQueueRows(); });
}

function visibleQueue() {
  const f = state.filters;
  return [...state.pending.values()]
    .filter((r) => (!f.host || r.host === f.host) && (!f.policy || r.policy === f.policy)
      && (!f.kind || r.target.kind === f.kind))
    .sort((a, b) => Date.parse(a.deadline) - Date.parse(b.deadline));
}

function renderQueue() {
  const main = document.getElementById('main');
  const filter = (name, label, control) => el('label', { for: `filter-${name}` }, label, control);
  const text = (name) => el('input', { id: `filter-${name}`, value: state.filters[name], placeholder: 'any' });
  const host = text('host');
  const policy = text('policy');
  const kind = el('select', { id: 'filter-kind' },
    el('option', { value: '' }, 'any'), el('option', { value: 'exec' }, 'exec'), el('option', { value: 'connect' }, 'connect'));
  kind.value = state.filters.kind;
  const apply = () => {
    state.filters = { host: host.value.trim(), policy: policy.value.trim(), kind: kind.value };
    startEvents();
  };
  for (const control of [host, policy]) control.addEventListener('change', apply);
  kind.addEventListener('change', apply);
  main.replaceChildren(
    el('h1', {}, 'Pending requests'),
    el('div', { class: 'filters', role: 'search' }, filter('host', 'Host', host), filter('policy', 'Policy', policy), filter('kind', 'Kind', kind)),
    el('table', { id: 'queue', 'aria-label': 'Pending requests' },
      el('thead', {}, el('tr', {}, ['Id', 'Kind', 'Executable', 'What', 'Host', 'Policy / rule', 'User', 'Approvals', 'Time left'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', { id: 'queue-rows' })),
    el('p', { id: 'queue-empty', class: 'muted', hidden: true }, 'Nothing is waiting for a decision.'),
  );
  renderQueueRows();
}

function renderQueueRows() {
  const body = document.getElementById('queue-rows');
  if (!body) return;
  const rows = visibleQueue();
  const shorts = shortIds(rows.map((r) => r.id));
  state.selected = Math.min(state.selected, Math.max(rows.length - 1, 0));
  const fragment = document.createDocumentFragment();
  rows.forEach((queued, index) => {
    const what = whatOf(queued);
    const left = timeLeft(queued.deadline);
    const link = el('a', { href: `#/request/${queued.id}`, class: 'mono' }, shorts[index]);
    const row = el('tr', { 'data-id': queued.id, class: index === state.selected ? 'selected' : '', 'aria-selected': index === state.selected ? 'true' : 'false' },
      el('td', {}, link),
      el('td', {}, queued.target.kind),
      el('td', {}, visible(what.exe)),
      el('td', {}, visible(what.args)),
      el('td', {}, visible(queued.host)),
      el('td', {}, visible(queued.policy), el('br'), el('span', { class: 'muted' }, visible(queued.rule))),
      el('td', {}, visible(queued.user_name || String(queued.uid))),
      el('td', {}, `${queued.approvals} of ${queued.approvals_required}`),
      el('td', { class: left.late ? 'late time-left' : 'time-left', 'data-deadline': queued.deadline }, left.text),
    );
    row.addEventListener('click', (event) => { if (event.target.tagName !== 'A') location.hash = `#/request/${queued.id}`; });
    fragment.append(row);
  });
  body.replaceChildren(fragment);
  document.getElementById('queue-empty').hidden = rows.length > 0;
  document.body.dataset.queueRows = String(rows.length);
}

function tick() {
  for (const cell of document.querySelectorAll('td.time-left')) {
    const left = timeLeft(cell.dataset.deadline);
    cell.textContent = left.text;
    cell.classList.toggle('late', left.late);
  }
  const own = document.getElementById('detail-time-left');
  if (own) own.textContent = timeLeft(own.dataset.deadline).text;
}

function moveSelection(step) {
  const rows = document.querySelectorAll('#queue-rows tr');
  if (!rows.length) return;
  rows[state.selected]?.classList.remove('selected');
  rows[state.selected]?.setAttribute('aria-selected', 'false');
  state.selected = Math.max(0, Math.min(rows.length - 1, state.selected + step));
  const row = rows[state.selected];
  row.classList.add('selected');
  row.setAttribute('aria-selected', 'true');
  row.querySelector('a').focus();
}

// ---------------------------------------------------------------- request detail

function fact(term, ...value) {
  return [el('dt', {}, term), el('dd', {}, ...value)];
}

function ancestryTree(ancestry) {
  // The agent sends the asking process first, then its parent...; show the oldest at the top.
  const chain = [...(ancestry || [])].reverse();
  if (!chain.length) return el('span', { class: 'muted' }, '(not known)');
  const root = el('ul', { class: 'tree', 'aria-label': 'Process ancestry' });
  let parent = root;
  for (const process of chain) {
    const item = el('li', {}, visible(process.comm), ` (pid ${process.pid}) `,
      process.executable ? visible(process.executable) : '',
      process.argv && process.argv.length ? el('div', {}, el('code', {}, shellLine(process.argv))) : '');
    parent.append(item);
    const children = el('ul');
    item.append(children);
    parent = children;
  }
  return root;
}

function targetFacts(target) {
  if (target.kind === 'exec') {
    const argv = el('ol', { class: 'argv', start: 0, 'aria-label': 'argv, one argument a line' },
      (target.argv || []).map((arg) => el('li', {}, visible(arg))));
    return [
      ...fact('Executable', visible(target.executable),
        target.path_check === 'unverified' ? el('strong', { class: 'why-not' }, ' UNVERIFIED: no host path of the file that runs') : ''),
      target.named ? fact('Name the workload passed', visible(target.named)) : [],
      target.mount_namespace ? fact('Mount namespace', visible(target.mount_namespace), ' (not the host\'s)') : [],
      ...fact('Command line (shell-quoted)', el('code', { id: 'argv-line' }, shellLine(target.argv || []))),
      ...fact('argv', argv, target.argv_truncated ? el('strong', { class: 'why-not' }, 'TRUNCATED: the kernel could not capture the whole argv') : ''),
      ...fact('Environment shown to reviewers', (target.env || []).length
        ? el('ul', {}, target.env.map((entry) => el('li', {}, visible(entry)))) : el('span', { class: 'muted' }, '(none bound)')),
      ...fact('Content version', target.content ? visible(target.content) : el('span', { class: 'muted' }, '(not known)'),
        target.file ? [' file ', visible(target.file)] : ''),
    ];
  }
  return [
    ...fact('Destination', visible(target.address), target.family === 'unix' ? '' : ` port ${target.port}`, ` (${target.family}, ${target.socket_type})`),
    ...fact('Name behind the address', (target.resolved || []).length
      ? el('ul', {}, target.resolved.map((name) => el('li', {}, visible(name)))) : el('span', { class: 'muted' }, '(no DNS answer seen)')),
  ];
}

async function renderDetail(idText, seq) {
  const main = document.getElementById('main');
  let detail;
  try {
    detail = await api('GET', `/requests/${encodeURIComponent(idText)}`);
  } catch (error) {
    if (seq !== state.renderSeq) return;
    main.replaceChildren(el('h1', {}, 'Request'), el('p', { class: 'why-not' }, error.message));
    return;
  }
  // Another route() ran meanwhile (the reviewer moved on, or a newer update came).
  if (seq !== state.renderSeq) return;
  // A refresh of the same request keeps what the reviewer was typing and choosing.
  const kept = {};
  for (const id of ['reason', 'duration', 'scope']) {
    const control = document.getElementById(id);
    if (control && main.dataset.request === detail.request.request.id) kept[id] = control.value;
  }
  const focused = document.activeElement?.id;
  const record = detail.request;
  const request = record.request;
  const settings = request.approval;
  const decided = record.state !== 'pending';
  const facts = el('dl', { class: 'facts' },
    ...fact('Id', el('span', { class: 'mono' }, request.id)),
    ...fact('State', el('strong', { class: `state-${record.state}` }, record.state)),
    ...fact('Host', visible(record.host)),
    ...fact('Policy / rule', visible(request.policy), ' / ', visible(request.rule)),
    ...targetFacts(request.target),
    ...fact('Working directory', visible(request.cwd)),
    ...fact('User', visible(request.user_name), ` (uid ${request.uid})`),
    ...fact('Process', `pid ${request.pid}, tid ${request.tid}`),
    ...fact('cgroup', visible(request.cgroup)),
    ...fact('Ancestry', ancestryTree(request.ancestry)),
    ...fact('Requested', when(request.requested_at)),
    ...fact('Time left', decided ? '—' : el('span', { id: 'detail-time-left', 'data-deadline': record.deadline }, timeLeft(record.deadline).text),
      ` (then ${request.on_timeout === 'allow' ? 'allowed' : 'denied'})`),
    ...fact('Reviewer groups', settings.reviewer_groups.length ? settings.reviewer_groups.join(', ') : 'any reviewer'),
  );
  const votes = el('section', { 'aria-labelledby': 'quorum-title' },
    el('h2', { id: 'quorum-title' }, `Approvals: ${record.approvals.length} of ${record.approvals_required}`),
    record.approvals.length
      ? el('ul', { id: 'approvals' }, record.approvals.map((vote) => el('li', {}, visible(vote.reviewer), ` at ${when(vote.at)}`,
        vote.reason ? [' — ', visible(vote.reason)] : '', ` (${vote.duration}, ${vote.scope})`)))
      : el('p', { class: 'muted' }, 'No approval yet.'));
  const parts = [el('h1', {}, `Request ${request.id.slice(0, 8)}`), facts, votes];
  if (record.decision) {
    const d = record.decision;
    parts.push(el('section', {}, el('h2', {}, 'Decision'),
      el('p', { id: 'decision' }, `${d.state} by `, visible(d.decided_by), ` at ${when(d.decided_at)}`, d.reason ? [' — ', visible(d.reason)] : '')));
  } else {
    parts.push(decideForm(record, detail.you));
  }
  parts.push(similarTable(detail.similar));
  main.replaceChildren(...parts);
  main.dataset.request = request.id;
  for (const [id, value] of Object.entries(kept)) {
    const control = document.getElementById(id);
    if (control) control.value = value;
  }
  if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
}

function decideForm(record, you) {
  const request = record.request;
  // The service refuses an approval without a reason for such a policy; the form says so
  // up front instead of after a refused click. Denials never need one.
  const reasonRequired = request.approval.require_reason === true;
  const reason = el('textarea', {
    id: 'reason', rows: 2, maxlength: 1000,
    'aria-required': reasonRequired ? 'true' : null,
    'aria-describedby': reasonRequired ? 'reason-why' : null,
  });
  // `once` is always allowed; the rest is what the policy's grant_durations list.
  const durations = ['once', ...request.approval.grant_durations.filter((d) => d !== 'once')];
  const duration = el('select', { id: 'duration' },
    durations.map((d) => el('option', { value: d }, d === 'once' ? 'this request only (once)' : d)));
  const scope = el('select', { id: 'scope' },
    el('option', { value: 'workload' }, 'the workload that asked'),
    el('option', { value: 'policy' }, 'every workload of the policy'));
  const approve = el('button', { type: 'button', id: 'approve', class: 'primary', disabled: !you.may_decide, 'aria-keyshortcuts': 'a' }, 'Approve');
  const deny = el('button', { type: 'button', id: 'deny', class: 'danger', disabled: !you.may_deny, 'aria-keyshortcuts': 'd' }, 'Deny');
  const cancel = el('button', { type: 'button', id: 'cancel-request', disabled: !you.may_deny }, 'Withdraw request');
  const send = async (path, body, done) => {
    for (const button of [approve, deny, cancel]) button.disabled = true;
    try {
      const result = await api('POST', `/requests/${request.id}/${path}`, body);
      notice(done(result));
      if (result.state !== 'pending') { state.pending.delete(request.id); location.hash = '#/queue'; } else route();
    } catch (error) {
      notice(error.message, true);
      approve.disabled = !you.may_decide; deny.disabled = !you.may_deny; cancel.disabled = !you.may_deny;
    }
  };
  approve.addEventListener('click', () => {
    if (reasonRequired && !reason.value.trim()) {
      notice(`Policy ${request.policy} requires a reason for approvals: say why in the reason field.`, true);
      reason.focus();
      return;
    }
    send('decision',
      { verdict: 'allow', reason: reason.value, duration: duration.value, scope: scope.value },
      (r) => r.state === 'approved' ? 'Approved.' : `Approval recorded: ${r.approvals.length} of ${r.approvals_required}.`);
  });
  deny.addEventListener('click', () => send('decision',
    { verdict: 'deny', reason: reason.value, duration: duration.value, scope: scope.value }, () => 'Denied.'));
  cancel.addEventListener('click', () => send('cancel', { reason: reason.value }, () => 'Withdrawn (denied).'));
  return el('section', { class: 'decide', 'aria-labelledby': 'decide-title' },
    el('h2', { id: 'decide-title' }, 'Decide'),
    you.may_decide ? null : el('p', { class: 'why-not', id: 'why-not' }, you.why_not),
    el('label', { for: 'reason' },
      reasonRequired ? 'Reason (required to approve; recorded in the audit log)' : 'Reason (recorded in the audit log)',
      reason),
    reasonRequired
      ? el('p', { class: 'muted', id: 'reason-why' }, 'Policy ', visible(request.policy),
        ' requires approvers to say why (require_reason). A denial needs no reason.')
      : null,
    el('div', { class: 'row' },
      el('label', { for: 'duration' }, 'Grant for', duration),
      el('label', { for: 'scope' }, 'Grant covers', scope)),
    el('div', { class: 'row' }, approve, deny, cancel));
}

function similarTable(similar) {
  const section = el('section', { 'aria-labelledby': 'similar-title' }, el('h2', { id: 'similar-title' }, 'Similar past decisions'));
  if (!similar || !similar.length) {
    section.append(el('p', { class: 'muted' }, 'None.'));
    return section;
  }
  section.append(el('table', { id: 'similar' },
    el('thead', {}, el('tr', {}, ['When', 'Outcome', 'By', 'Reason', 'Host'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, similar.map((r) => el('tr', {},
      el('td', {}, el('a', { href: `#/request/${r.request.id}` }, when(r.request.requested_at))),
      el('td', { class: `state-${r.state}` }, r.state),
      el('td', {}, visible(r.decision ? r.decision.decided_by : '')),
      el('td', {}, visible(r.decision ? r.decision.reason : '')),
      el('td', {}, visible(r.host)))))));
  return section;
}

// ---------------------------------------------------------------- grants and audit

async function renderGrants(seq) {
  const main = document.getElementById('main');
  const all = el('input', { type: 'checkbox', id: 'grants-all' });
  const table = el('tbody', { id: 'grant-rows' });
  const load = async () => {
    const { grants } = await api('GET', `/grants${all.checked ? '?include_inactive=true' : ''}`);
    table.replaceChildren(...grants.map((g) => {
      const what = whatOf({ target: g.target });
      const revoke = el('button', { type: 'button', class: 'danger', 'aria-label': `Revoke grant ${g.id.slice(0, 8)}` }, 'Revoke');
      revoke.disabled = Boolean(g.revoked);
      revoke.addEventListener('click', async () => {
        const reason = document.getElementById('revoke-reason').value;
        try { await api('POST', `/grants/${g.id}/revoke`, { reason }); notice('Grant revoked.'); load(); } catch (error) { notice(error.message, true); }
      });
      return el('tr', {},
        el('td', { class: 'mono' }, g.id.slice(0, 8)),
        el('td', {}, g.verdict),
        el('td', {}, visible(what.exe), ' ', visible(what.args)),
        el('td', {}, visible(g.host)),
        el('td', {}, visible(g.policy)),
        el('td', {}, g.scope, g.cgroup ? [' ', visible(g.cgroup)] : ''),
        el('td', {}, g.expires_at ? when(g.expires_at) : g.duration),
        el('td', {}, visible(g.created_by)),
        el('td', {}, g.revoked ? ['revoked by ', visible(g.revoked.by)] : revoke));
    }));
  };
  all.addEventListener('change', load);
  main.replaceChildren(
    el('h1', {}, 'Grants'),
    el('div', { class: 'filters' },
      el('label', { for: 'grants-all' }, 'Include revoked and expired', all),
      el('label', { for: 'revoke-reason' }, 'Reason for a revocation', el('input', { id: 'revoke-reason' }))),
    el('table', { 'aria-label': 'Grants' },
      el('thead', {}, el('tr', {}, ['Id', 'Verdict', 'What', 'Host', 'Policy', 'Scope', 'Until', 'By', ''].map((h) => el('th', { scope: 'col' }, h)))),
      table));
  try { await load(); } catch (error) { if (seq === state.renderSeq) notice(error.message, true); }
}

function renderAudit() {
  const main = document.getElementById('main');
  const result = el('p', { id: 'verify-result', role: 'status' });
  const verify = el('button', { type: 'button', id: 'verify', class: 'primary' }, 'Verify the hash chain');
  verify.addEventListener('click', async () => {
    result.textContent = 'Verifying…';
    try {
      const report = await api('GET', '/audit/verify');
      result.textContent = `Intact: ${report.records} records, head #${report.head_seq} ${report.head_hash.slice(0, 16)}…, guards ${report.guards_intact ? 'intact' : 'MISSING'}.`;
    } catch (error) {
      result.textContent = `NOT INTACT: ${error.message}`;
    }
  });
  const exportButton = el('button', { type: 'button', id: 'export' }, 'Export (JSON Lines)');
  exportButton.addEventListener('click', async () => {
    const response = await fetch('/api/v1/audit/export', { credentials: 'same-origin' });
    if (!response.ok) { notice(`export failed: ${response.status}`, true); return; }
    const url = URL.createObjectURL(await response.blob());
    const link = el('a', { href: url, download: 'gatekeep-audit.jsonl' });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  });
  main.replaceChildren(el('h1', {}, 'Audit log'),
    el('p', {}, 'Every request and decision is one hash-chained record; verify proves the chain, export writes it for a SIEM or an auditor.'),
    el('div', { class: 'row' }, verify, ' ', exportButton), result);
}

// ---------------------------------------------------------------- routing and keys

function route() {
  if (!state.session) return;
  const hash = location.hash || '#/queue';
  state.route = hash.startsWith('#/request/') ? hash : hash.split('?')[0];
  for (const [id, prefix] of [['nav-queue', '#/queue'], ['nav-grants', '#/grants'], ['nav-audit', '#/audit']]) {
    const link = document.getElementById(id);
    if (state.route === prefix) link.setAttribute('aria-current', 'page'); else link.removeAttribute('aria-current');
  }
  state.renderSeq += 1;
  const seq = state.renderSeq;
  if (state.route !== '#/request/' + (document.getElementById('main').dataset.request || '')) {
    delete document.getElementById('main').dataset.request;
  }
  if (state.route.startsWith('#/request/')) renderDetail(decodeURIComponent(state.route.slice('#/request/'.length)), seq);
  else if (state.route === '#/grants') renderGrants(seq);
  else if (state.route === '#/audit') renderAudit();
  else { state.route = '#/queue'; renderQueue(); }
}

function onKey(event) {
  if (!state.session || event.ctrlKey || event.metaKey || event.altKey) return;
  const typing = ['INPUT', 'TEXTAREA', 'SELECT'].includes(document.activeElement?.tagName);
  if (event.key === 'Escape') {
    if (typing) document.activeElement.blur(); else if (state.route !== '#/queue') location.hash = '#/queue';
    return;
  }
  if (typing) return;
  if (state.gPressed) {
    state.gPressed = false;
    const target = { q: '#/queue', g: '#/grants', a: '#/audit' }[event.key];
    if (target) { location.hash = target; event.preventDefault(); }
    return;
  }
  switch (event.key) {
    case 'g': state.gPressed = true; setTimeout(() => { state.gPressed = false; }, 1500); break;
    case '?': document.getElementById('help').showModal(); break;
    case 'j': if (state.route === '#/queue') { moveSelection(1); event.preventDefault(); } break;
    case 'k': if (state.route === '#/queue') { moveSelection(-1); event.preventDefault(); } break;
    case '/': if (state.route === '#/queue') { document.getElementById('filter-host').focus(); event.preventDefault(); } break;
    case 'o': case 'Enter':
      // Enter on a focused link follows it by itself.
      if (state.route === '#/queue' && (event.key === 'o' || document.activeElement?.tagName !== 'A')) {
        const row = document.querySelectorAll('#queue-rows tr')[state.selected];
        if (row) { location.hash = `#/request/${row.dataset.id}`; event.preventDefault(); }
      }
      break;
    case 'a': document.getElementById('approve')?.focus(); break;
    case 'd': document.getElementById('deny')?.focus(); break;
    default: break;
  }
}

async function start() {
  document.getElementById('sign-out').addEventListener('click', signOut);
  document.getElementById('help-button').addEventListener('click', () => document.getElementById('help').showModal());
  window.addEventListener('hashchange', route);
  document.addEventListener('keydown', onKey);
  setInterval(tick, 1000);
  try { state.auth = await (await fetch('/api/v1/auth', { credentials: 'same-origin' })).json(); } catch (_) { state.auth = null; }
  const problem = new URLSearchParams(location.search).get('error');
  try {
    state.session = await api('GET', '/session');
    signedIn();
  } catch (_) {
    renderSignIn(problem);
  }
}

document.addEventListener('DOMContentLoaded', start);
