/* Tests for portcullis_json.h, run natively by scripts/test under the
 * address and undefined-behaviour sanitizers. */
#include <stdio.h>
#include <stdlib.h>

#include "portcullis_json.h"

static int failures;

#define CHECK(cond)                                                   \
    do {                                                              \
        if (!(cond)) {                                                \
            fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                               \
        }                                                             \
    } while (0)

static bool parse(const char *text, pc_json *out) { return pc_json_parse(text, strlen(text), out); }

static void test_valid_and_malformed_documents(void) {
    pc_json v;
    const char *valid[] = {"{}", " [ ] ", "\"a\\u00e9\\n\"", "-0.5e+3", "true", "null",
                           "{\"a\": [1, {\"b\": false}], \"c\": \"\\\"\"}"};
    for (size_t i = 0; i < sizeof valid / sizeof *valid; i++) CHECK(parse(valid[i], &v));
    const char *malformed[] = {"", "{", "{\"a\"}", "[1,]", "{\"a\":1,}", "01", "1.", "\"\\x\"", "\"\x01\"",
                               "tru", "[1] 2", "{\"a\" 1}", "\"abc", "\"\\u12\"", "-", "{1: 2}"};
    for (size_t i = 0; i < sizeof malformed / sizeof *malformed; i++) CHECK(!parse(malformed[i], &v));
    char deep[200];
    memset(deep, '[', sizeof deep);
    CHECK(!pc_json_parse(deep, sizeof deep, &v));
}

static void test_members_and_types(void) {
    pc_json doc, value;
    CHECK(parse("{\"name\": \"read_file\", \"arguments\": {\"path\": \"/srv/a\"}, \"n\": 3, \"x\": null}", &doc));
    CHECK(pc_json_type(doc) == '{');
    CHECK(pc_json_get(doc, "arguments", &value) && pc_json_type(value) == '{');
    pc_json path;
    CHECK(pc_json_get(value, "path", &path) && pc_json_string_equals(path, "/srv/a"));
    CHECK(pc_json_get(doc, "n", &value) && pc_json_type(value) == 'n');
    CHECK(pc_json_get(doc, "x", &value) && pc_json_type(value) == '0');
    CHECK(!pc_json_get(doc, "missing", &value));
    CHECK(!pc_json_get(path, "path", &value));
}

static void test_iteration(void) {
    pc_json doc, cursor = {0};
    CHECK(parse("[\"a\", [1, 2], {\"k\": \"v\"}, \"b\"]", &doc));
    const char types[] = {'"', '[', '{', '"'};
    int count = 0;
    while (pc_json_next(doc, &cursor, NULL)) {
        CHECK(count < 4 && pc_json_type(cursor) == types[count]);
        count++;
    }
    CHECK(count == 4);
    CHECK(parse("[]", &doc));
    cursor.start = NULL;
    CHECK(!pc_json_next(doc, &cursor, NULL));
    pc_json key;
    CHECK(parse("{\"x\": 1, \"y\": [true]}", &doc));
    cursor.start = NULL;
    CHECK(pc_json_next(doc, &cursor, &key) && pc_json_string_equals(key, "x"));
    CHECK(pc_json_next(doc, &cursor, &key) && pc_json_string_equals(key, "y") && pc_json_type(cursor) == '[');
    CHECK(!pc_json_next(doc, &cursor, &key));
}

static void test_string_decoding(void) {
    pc_json v;
    char buf[32];
    CHECK(parse("\"tab\\there \\\"q\\\" \\/ \\\\\"", &v));
    CHECK(pc_json_string(v, buf, sizeof buf) >= 0 && strcmp(buf, "tab\there \"q\" / \\") == 0);
    CHECK(parse("\"\\u00e9\\u20ac\\ud83d\\ude00\"", &v));
    CHECK(pc_json_string(v, buf, sizeof buf) == 9 && strcmp(buf, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80") == 0);
    CHECK(parse("\"caf\xc3\xa9\"", &v) && pc_json_string_equals(v, "caf\xc3\xa9"));
    CHECK(parse("\"too long for the buffer, far too long\"", &v) && pc_json_string(v, buf, sizeof buf) == -1);
    CHECK(parse("12", &v) && pc_json_string(v, buf, sizeof buf) == -1);
    CHECK(parse("\"a\\u0000b\"", &v) && !pc_json_string_equals(v, "a"));
}

static void test_copies_are_terminated(void) {
    const char text[] = {'{', '}', 'x'};
    char *copy = pc_json_copy(text, 2);
    pc_json v;
    CHECK(copy && strcmp(copy, "{}") == 0 && pc_json_parse(copy, 2, &v));
    free(copy);
}

int main(void) {
    test_valid_and_malformed_documents();
    test_members_and_types();
    test_iteration();
    test_string_decoding();
    test_copies_are_terminated();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    puts("portcullis_json.h: all checks passed");
    return 0;
}
