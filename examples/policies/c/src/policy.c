/* The reference policy in C: read-only, plus an argument rule, plus a tag. */
#include <stdio.h>
#include <stdlib.h>

#include "policy.h"
#include "portcullis_json.h"

#define DENIED (-32001)

/* The settings JSON text, kept for the instance's life; `allow` and `roots`
 * point into it. */
static char *settings_text;
static pc_json allow, roots;

typedef exports_portcullis_policy_hooks_exchange_t exchange_t;
typedef exports_portcullis_policy_hooks_verdict_t verdict_t;

static void tag(verdict_t *verdict, const char *label) {
    verdict->tags.ptr = malloc(sizeof(policy_string_t));
    verdict->tags.len = 1;
    policy_string_dup(&verdict->tags.ptr[0], label);
}

static void allow_checked(verdict_t *verdict) {
    verdict->outcome.tag = PORTCULLIS_POLICY_TYPES_OUTCOME_ALLOW;
    tag(verdict, "checked");
}

static void deny(verdict_t *verdict, const char *reason, const char *label) {
    verdict->outcome.tag = PORTCULLIS_POLICY_TYPES_OUTCOME_DENY;
    verdict->outcome.val.deny.code = DENIED;
    policy_string_dup(&verdict->outcome.val.deny.reason, reason);
    tag(verdict, label);
}

static bool is_list(pc_json *list, pc_json settings, const char *name) {
    if (!pc_json_get(settings, name, list)) {
        pc_json_parse("[]", 2, list);
        return true;
    }
    return pc_json_type(*list) == '[';
}

bool exports_portcullis_policy_hooks_configure(policy_string_t *text, policy_string_t *err) {
    free(settings_text);
    size_t len = text->len;
    settings_text = pc_json_copy(text->ptr, len);
    policy_string_free(text);
    pc_json settings;
    const char *problem = NULL;
    if (!settings_text || !pc_json_parse(settings_text, len, &settings) || pc_json_type(settings) != '{')
        problem = "settings must be a JSON object";
    else if (!is_list(&allow, settings, "allow"))
        problem = "allow must be a list of tool names";
    else if (!is_list(&roots, settings, "roots"))
        problem = "roots must be a list of directories";
    if (problem) policy_string_dup(err, problem);
    return problem == NULL;
}

static bool has_items(pc_json list) {
    pc_json item = {0};
    return pc_json_next(list, &item, NULL);
}

static bool listed(pc_json list, const char *name) {
    pc_json item = {0};
    while (pc_json_next(list, &item, NULL))
        if (pc_json_string_equals(item, name)) return true;
    return false;
}

/* Whether `path` is a root or lies below one (not merely sharing its prefix). */
static bool inside_roots(const char *path) {
    pc_json item = {0};
    char root[4096];
    while (pc_json_next(roots, &item, NULL)) {
        long n = pc_json_string(item, root, sizeof root);
        while (n > 0 && root[n - 1] == '/') root[--n] = 0;
        if (n < 0 || strncmp(path, root, (size_t)n) != 0) continue;
        if (path[n] == 0 || path[n] == '/') return true;
    }
    return false;
}

static bool is_tool_call(const exchange_t *exchange) {
    const char *method = "tools/call";
    return exchange->kind == PORTCULLIS_POLICY_TYPES_MESSAGE_KIND_REQUEST &&
           exchange->method.len == strlen(method) && memcmp(exchange->method.ptr, method, exchange->method.len) == 0;
}

static void judge_tool_call(const exchange_t *exchange, verdict_t *verdict) {
    char tool[1024] = "";
    if (exchange->tool.is_some && exchange->tool.val.len < sizeof tool)
        memcpy(tool, exchange->tool.val.ptr, exchange->tool.val.len), tool[exchange->tool.val.len] = 0;
    bool read_only = exchange->annotations.is_some && exchange->annotations.val.read_only_hint.is_some &&
                     exchange->annotations.val.read_only_hint.val;
    char reason[4400];
    if (!read_only && !listed(allow, tool)) {
        snprintf(reason, sizeof reason, "refusing %s", tool);
        policy_string_t line;
        policy_string_set(&line, reason);
        portcullis_policy_log_log(PORTCULLIS_POLICY_LOG_LEVEL_INFO, &line);
        snprintf(reason, sizeof reason, "tool '%s' is not declared read-only (readOnlyHint)", tool);
        return deny(verdict, reason, "write-refused");
    }
    pc_json params, arguments, path_value;
    bool has_path = exchange->params.is_some &&
                    pc_json_parse((const char *)exchange->params.val.ptr, exchange->params.val.len, &params) &&
                    pc_json_get(params, "arguments", &arguments) && pc_json_get(arguments, "path", &path_value) &&
                    pc_json_type(path_value) == '"';
    if (has_path && has_items(roots)) {
        char path[4096];
        long n = pc_json_string(path_value, path, sizeof path);
        if (n < 0) return deny(verdict, "argument 'path' is too long to check against the allowed roots", "bad-arguments");
        /* A decoded NUL byte would hide the rest of the path from the check. */
        if ((size_t)n != strlen(path) || !inside_roots(path)) {
            snprintf(reason, sizeof reason, "argument 'path' path '%s' is outside the allowed roots", path);
            return deny(verdict, reason, "bad-arguments");
        }
    }
    allow_checked(verdict);
}

void exports_portcullis_policy_hooks_on_request(exchange_t *exchange, verdict_t *verdict) {
    *verdict = (verdict_t){0};
    if (is_tool_call(exchange))
        judge_tool_call(exchange, verdict);
    else
        verdict->outcome.tag = PORTCULLIS_POLICY_TYPES_OUTCOME_ALLOW;
    exports_portcullis_policy_hooks_exchange_free(exchange);
}

void exports_portcullis_policy_hooks_on_response(exchange_t *exchange, verdict_t *verdict) {
    *verdict = (verdict_t){0};
    verdict->outcome.tag = PORTCULLIS_POLICY_TYPES_OUTCOME_ALLOW;
    exports_portcullis_policy_hooks_exchange_free(exchange);
}
