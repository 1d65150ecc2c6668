/* The {{name}} policy: refuses calls to tools the server marks destructive,
 * unless its settings allow them. */
#include <stdio.h>
#include <stdlib.h>

#include "policy.h"
#include "portcullis_json.h"

typedef exports_portcullis_policy_hooks_exchange_t exchange_t;
typedef exports_portcullis_policy_hooks_verdict_t verdict_t;

/* The settings JSON text, kept for the instance's life; `allow` points into it. */
static char *settings_text;
static pc_json allow;

/* Settings arrive as JSON text; returning false with `err` set rejects them. */
bool exports_portcullis_policy_hooks_configure(policy_string_t *text, policy_string_t *err) {
    free(settings_text);
    size_t len = text->len;
    settings_text = pc_json_copy(text->ptr, len);
    policy_string_free(text);
    pc_json settings, key, value = {0};
    if (!settings_text || !pc_json_parse(settings_text, len, &settings) || pc_json_type(settings) != '{') {
        policy_string_dup(err, "settings must be a JSON object");
        return false;
    }
    while (pc_json_next(settings, &value, &key)) {
        if (!pc_json_string_equals(key, "allow")) {
            policy_string_dup(err, "unknown setting (only 'allow' is known)");
            return false;
        }
    }
    if (!pc_json_get(settings, "allow", &allow)) pc_json_parse("[]", 2, &allow);
    if (pc_json_type(allow) != '[') {
        policy_string_dup(err, "allow must be a list");
        return false;
    }
    return true;
}

static bool allowed(const char *tool) {
    pc_json item = {0};
    while (pc_json_next(allow, &item, NULL))
        if (pc_json_string_equals(item, tool)) return true;
    return false;
}

/* Sets the verdict's outcome to allow or deny, with one tag. */
static void decide(verdict_t *verdict, const char *refusal, const char *label) {
    if (refusal) {
        verdict->outcome.tag = PORTCULLIS_POLICY_TYPES_OUTCOME_DENY;
        verdict->outcome.val.deny.code = -32001;
        policy_string_dup(&verdict->outcome.val.deny.reason, refusal);
    } else {
        verdict->outcome.tag = PORTCULLIS_POLICY_TYPES_OUTCOME_ALLOW;
    }
    verdict->tags.ptr = malloc(sizeof(policy_string_t));
    verdict->tags.len = 1;
    policy_string_dup(&verdict->tags.ptr[0], label);
}

static bool is_tool_call(const exchange_t *exchange) {
    return exchange->kind == PORTCULLIS_POLICY_TYPES_MESSAGE_KIND_REQUEST && exchange->method.len == 10 &&
           memcmp(exchange->method.ptr, "tools/call", 10) == 0;
}

/* The exchange belongs to the callee: free it before returning. */
void exports_portcullis_policy_hooks_on_request(exchange_t *exchange, verdict_t *verdict) {
    *verdict = (verdict_t){0};
    verdict->outcome.tag = PORTCULLIS_POLICY_TYPES_OUTCOME_ALLOW;
    if (is_tool_call(exchange)) {
        char tool[1024] = "";
        if (exchange->tool.is_some && exchange->tool.val.len < sizeof tool)
            memcpy(tool, exchange->tool.val.ptr, exchange->tool.val.len);
        bool destructive = exchange->annotations.is_some && exchange->annotations.val.destructive_hint.is_some &&
                           exchange->annotations.val.destructive_hint.val;
        if (destructive && !allowed(tool)) {
            char text[1200];
            snprintf(text, sizeof text, "refusing %s", tool);
            policy_string_t line;
            policy_string_set(&line, text);
            portcullis_policy_log_log(PORTCULLIS_POLICY_LOG_LEVEL_INFO, &line);
            snprintf(text, sizeof text, "tool '%s' is destructive", tool);
            decide(verdict, text, "destructive");
        } else {
            decide(verdict, NULL, "checked");
        }
    }
    exports_portcullis_policy_hooks_exchange_free(exchange);
}

void exports_portcullis_policy_hooks_on_response(exchange_t *exchange, verdict_t *verdict) {
    *verdict = (verdict_t){0};
    verdict->outcome.tag = PORTCULLIS_POLICY_TYPES_OUTCOME_ALLOW;
    exports_portcullis_policy_hooks_exchange_free(exchange);
}
