// The {{name}} policy: refuses calls to tools the server marks destructive,
// unless its settings allow them.
import { log } from 'portcullis:policy/log@0.1.0';

let allow = [];

const verdict = (outcome, ...tags) => ({ outcome, tags });

export const hooks = {
  // Settings arrive as JSON text; throwing a string rejects them.
  configure(text) {
    const settings = JSON.parse(text);
    for (const key of Object.keys(settings)) {
      if (key !== 'allow') throw `unknown setting '${key}'`;
    }
    if (settings.allow !== undefined && !Array.isArray(settings.allow)) throw 'allow must be a list';
    allow = settings.allow ?? [];
  },

  onRequest(exchange) {
    if (exchange.kind !== 'request' || exchange.method !== 'tools/call') return verdict({ tag: 'allow' });
    const tool = exchange.tool ?? '';
    if (exchange.annotations?.destructiveHint === true && !allow.includes(tool)) {
      log('info', `refusing ${tool}`);
      return verdict({ tag: 'deny', val: { code: -32001, reason: `tool '${tool}' is destructive` } }, 'destructive');
    }
    return verdict({ tag: 'allow' }, 'checked');
  },

  onResponse() {
    return verdict({ tag: 'allow' });
  },
};
