// The reference policy in JavaScript: read-only, plus an argument rule, plus a tag.
import { log } from 'portcullis:policy/log@0.1.0';

let settings = { allow: [], roots: [] };

const verdict = (outcome, ...tags) => ({ outcome, tags });
const deny = (reason, tag) => verdict({ tag: 'deny', val: { code: -32001, reason } }, tag);

function insideRoots(path) {
  return settings.roots.some((root) => path === root || path.startsWith(root.replace(/\/$/, '') + '/'));
}

export const hooks = {
  configure(text) {
    const parsed = JSON.parse(text);
    for (const key of ['allow', 'roots']) {
      if (parsed[key] !== undefined && !Array.isArray(parsed[key])) throw `${key} must be a list`;
    }
    settings = { allow: parsed.allow ?? [], roots: parsed.roots ?? [] };
  },

  onRequest(exchange) {
    if (exchange.kind !== 'request' || exchange.method !== 'tools/call') return verdict({ tag: 'allow' });
    const tool = exchange.tool ?? '';
    const readOnly = exchange.annotations?.readOnlyHint === true;
    if (!readOnly && !settings.allow.includes(tool)) {
      log('info', `refusing ${tool}`);
      return deny(`tool '${tool}' is not declared read-only (readOnlyHint)`, 'write-refused');
    }
    const args = JSON.parse(exchange.params ?? '{}').arguments ?? {};
    if (settings.roots.length > 0 && typeof args.path === 'string' && !insideRoots(args.path)) {
      return deny(`argument 'path' path '${args.path}' is outside the allowed roots`, 'bad-arguments');
    }
    return verdict({ tag: 'allow' }, 'checked');
  },

  onResponse() {
    return verdict({ tag: 'allow' });
  },
};
