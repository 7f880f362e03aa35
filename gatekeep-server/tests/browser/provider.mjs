// A real OpenID provider for gatekeep-server's console tests: `oidc-provider` (a certified
// OpenID Connect implementation) on loopback, with test users and groups. Started by the
// tests themselves (gatekeep-server/tests/console.rs); installed by `cargo xtask setup`.
//
// Environment: PORT, CLIENT_ID, CLIENT_SECRET, REDIRECT_URIS (comma separated), and
// KEYS_FILE (its signing keys: read if it exists, else made and written, so two providers
// can share keys, or a restart can rotate them). Prints `READY <issuer>` when listening.
//
// Sign-in page: /interaction/UID shows a form choosing the user (no passwords: a test IdP).
import { createServer } from 'node:http';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import Provider from 'oidc-provider';
import { exportJWK, generateKeyPair } from 'jose';

const USERS = {
  alice: ['sre'],
  bob: ['sre'],
  carol: ['security'],
  dave: ['sre', 'security'],
};

const port = Number(process.env.PORT);
const issuer = `http://127.0.0.1:${port}`;

async function signingKeys(file) {
  if (file && existsSync(file)) return JSON.parse(readFileSync(file, 'utf8'));
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  const jwk = await exportJWK(privateKey);
  Object.assign(jwk, { kid: `test-${randomUUID()}`, alg: 'RS256', use: 'sig' });
  const keys = { keys: [jwk] };
  if (file) writeFileSync(file, JSON.stringify(keys));
  return keys;
}

const provider = new Provider(issuer, {
  clients: [{
    client_id: process.env.CLIENT_ID,
    client_secret: process.env.CLIENT_SECRET,
    redirect_uris: process.env.REDIRECT_URIS.split(','),
    grant_types: ['authorization_code', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }, {
    // `gatekeep login`: a public client of the device authorization grant.
    client_id: process.env.CLI_CLIENT_ID || 'gatekeep-cli',
    grant_types: ['urn:ietf:params:oauth:grant-type:device_code'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'none',
  }],
  jwks: await signingKeys(process.env.KEYS_FILE),
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  scopes: ['openid', 'email', 'profile', 'groups'],
  // Scope claims in the ID token too (the console reads groups from it).
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true,
      // Plain pages with known ids (the defaults load a web font from the internet).
      async userCodeInputSource(ctx, form, _out, err) {
        ctx.body = `<!doctype html><html><body><h1>Enter the code</h1>${err ? '<p id="error">error</p>' : ''}
          ${form}<label>Code <input id="user-code" name="user_code" form="op.deviceInputForm"></label>
          <button type="submit" id="device-submit" form="op.deviceInputForm">Continue</button></body></html>`;
      },
      async userCodeConfirmSource(ctx, form, _client, _deviceInfo, userCode) {
        ctx.body = `<!doctype html><html><body><h1>Confirm</h1><p id="code">${userCode}</p>${form}
          <button type="submit" id="device-confirm" form="op.deviceConfirmForm">Continue</button></body></html>`;
      },
      async successSource(ctx) {
        ctx.body = '<!doctype html><html><body><h1 id="device-done">Signed in; return to the terminal.</h1></body></html>';
      },
    },
  },
  pkce: { required: () => true },
  cookies: { keys: ['gatekeep-test-provider-only'] },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  async findAccount(_ctx, id) {
    if (!USERS[id]) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: `${id}@example.com`, email_verified: true, name: id, groups: USERS[id] };
      },
    };
  },
});

function page(res, status, body) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8' });
  res.end(`<!doctype html><html lang="en"><head><title>Test IdP</title></head><body>${body}</body></html>`);
}

async function readForm(req) {
  let text = '';
  for await (const chunk of req) text += chunk;
  return new URLSearchParams(text);
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  if (req.method === 'GET') {
    const options = Object.keys(USERS).map((u) => `<option value="${u}">${u}</option>`).join('');
    page(res, 200, `<h1>Test IdP sign-in</h1><p id="prompt">${details.prompt.name}</p>
      <form method="post" action="/interaction/${uid}/login">
      <label>User <select name="user" id="user">${options}</select></label>
      <button type="submit" id="idp-sign-in">Sign in</button></form>`);
    return;
  }
  if (action !== 'login') throw new Error('unknown action');
  const user = (await readForm(req)).get('user');
  if (!USERS[user]) { page(res, 400, 'unknown user'); return; }
  const grant = new provider.Grant({ accountId: user, clientId: details.params.client_id });
  grant.addOIDCScope(details.params.scope || 'openid');
  const grantId = await grant.save();
  await provider.interactionFinished(req, res,
    { login: { accountId: user }, consent: { grantId } },
    { mergeWithLastSubmission: false });
}

const callback = provider.callback();
const server = createServer(async (req, res) => {
  const match = new URL(req.url, issuer).pathname.match(/^\/interaction\/([^/]+)(?:\/(login))?$/);
  if (!match) { callback(req, res); return; }
  try {
    await interaction(req, res, match[1], match[2]);
  } catch (error) {
    page(res, 500, `interaction failed: ${String(error).replace(/[<>&]/g, '')}`);
  }
});
server.listen(port, '127.0.0.1', () => console.log(`READY ${issuer}`));
