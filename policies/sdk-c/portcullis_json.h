/*
 * A small JSON reader for Portcullis policies written in C.
 *
 * The WIT contract hands a policy its settings, a message's params and results
 * as JSON text. This header reads that text in place, without allocating:
 * a `pc_json` is a view of one value inside it. Every function validates what
 * it walks over and fails (returns false / -1) on malformed input, so a policy
 * can refuse a message it cannot read instead of guessing.
 *
 * Header-only: include it in one or more files of a policy.
 */
#ifndef PORTCULLIS_JSON_H
#define PORTCULLIS_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One JSON value: the bytes from `start` up to (not including) `end`. */
typedef struct {
    const char *start;
    const char *end;
} pc_json;

/* A malloc'd, NUL-terminated copy of `len` bytes of text (the bindings hand
 * strings over as a pointer and a length, and free them after the call). */
static inline char *pc_json_copy(const void *text, size_t len) {
    char *copy = malloc(len + 1);
    if (copy) {
        memcpy(copy, text, len);
        copy[len] = 0;
    }
    return copy;
}

/* Values nested deeper than this are refused as malformed. */
#define PC_JSON_MAX_DEPTH 64

static inline const char *pc_json__space(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static inline const char *pc_json__value(const char *p, const char *end, int depth);

static inline const char *pc_json__string(const char *p, const char *end) {
    if (p >= end || *p != '"') return NULL;
    for (p++; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') return p + 1;
        if (c < 0x20) return NULL;
        if (c == '\\') {
            if (++p >= end) return NULL;
            if (*p == 'u') {
                for (int i = 0; i < 4; i++) {
                    char h = (++p < end) ? *p : 0;
                    bool hex = (h >= '0' && h <= '9') || (h >= 'a' && h <= 'f') || (h >= 'A' && h <= 'F');
                    if (!hex) return NULL;
                }
            } else if (!strchr("\"\\/bfnrt", *p) || *p == 0) {
                return NULL;
            }
        }
    }
    return NULL;
}

static inline const char *pc_json__digits(const char *p, const char *end) {
    const char *first = p;
    while (p < end && *p >= '0' && *p <= '9') p++;
    return p == first ? NULL : p;
}

static inline const char *pc_json__number(const char *p, const char *end) {
    if (p < end && *p == '-') p++;
    if (p < end && *p == '0') p++;
    else if (!(p = pc_json__digits(p, end))) return NULL;
    if (p < end && *p == '.' && !(p = pc_json__digits(p + 1, end))) return NULL;
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (!(p = pc_json__digits(p, end))) return NULL;
    }
    return p;
}

static inline const char *pc_json__literal(const char *p, const char *end, const char *word) {
    size_t n = strlen(word);
    return ((size_t)(end - p) >= n && memcmp(p, word, n) == 0) ? p + n : NULL;
}

/* Walks an object or array body after its opening bracket. */
static inline const char *pc_json__members(const char *p, const char *end, int depth, char close, bool keyed) {
    p = pc_json__space(p, end);
    if (p < end && *p == close) return p + 1;
    for (;;) {
        if (keyed) {
            if (!(p = pc_json__string(p, end))) return NULL;
            p = pc_json__space(p, end);
            if (p >= end || *p != ':') return NULL;
            p = pc_json__space(p + 1, end);
        }
        if (!(p = pc_json__value(p, end, depth + 1))) return NULL;
        p = pc_json__space(p, end);
        if (p < end && *p == close) return p + 1;
        if (p >= end || *p != ',') return NULL;
        p = pc_json__space(p + 1, end);
    }
}

static inline const char *pc_json__value(const char *p, const char *end, int depth) {
    if (depth > PC_JSON_MAX_DEPTH || p >= end) return NULL;
    switch (*p) {
    case '{': return pc_json__members(p + 1, end, depth, '}', true);
    case '[': return pc_json__members(p + 1, end, depth, ']', false);
    case '"': return pc_json__string(p, end);
    case 't': return pc_json__literal(p, end, "true");
    case 'f': return pc_json__literal(p, end, "false");
    case 'n': return pc_json__literal(p, end, "null");
    default: return pc_json__number(p, end);
    }
}

/* Parses `len` bytes of text holding exactly one JSON value. */
static inline bool pc_json_parse(const char *text, size_t len, pc_json *out) {
    const char *end = text + len;
    const char *start = pc_json__space(text, end);
    const char *after = pc_json__value(start, end, 0);
    if (!after || pc_json__space(after, end) != end) return false;
    out->start = start;
    out->end = after;
    return true;
}

/* The value's type: '{' object, '[' array, '"' string, 'n' number,
 * 't' true, 'f' false, '0' null. */
static inline char pc_json_type(pc_json value) {
    switch (*value.start) {
    case '{': case '[': case '"': case 't': case 'f': return *value.start;
    case 'n': return '0';
    default: return 'n';
    }
}

/* Steps through the elements of an array, or the values of an object (with
 * `key` set to the member's name). Start with `cursor->start == NULL`. */
static inline bool pc_json_next(pc_json container, pc_json *cursor, pc_json *key) {
    const char *p = cursor->start ? cursor->end : container.start + 1;
    p = pc_json__space(p, container.end);
    if (cursor->start && *p == ',') p = pc_json__space(p + 1, container.end);
    if (p >= container.end - 1) return false;
    if (*container.start == '{') {
        const char *name_end = pc_json__string(p, container.end);
        if (key) { key->start = p; key->end = name_end; }
        p = pc_json__space(pc_json__space(name_end, container.end) + 1, container.end);
    }
    cursor->start = p;
    cursor->end = pc_json__value(p, container.end, 0);
    return true;
}

static inline uint32_t pc_json__hex4(const char *p) {
    uint32_t c = 0;
    for (int i = 0; i < 4; i++) c = c * 16 + (uint32_t)(p[i] <= '9' ? p[i] - '0' : (p[i] | 0x20) - 'a' + 10);
    return c;
}

/* Encodes a code point as UTF-8 into `out`; returns the number of bytes. */
static inline size_t pc_json__utf8(uint32_t c, char *out) {
    if (c < 0x80) {
        out[0] = (char)c;
        return 1;
    }
    if (c < 0x800) {
        out[0] = (char)(0xC0 | (c >> 6));
        out[1] = (char)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        out[0] = (char)(0xE0 | (c >> 12));
        out[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        out[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (c >> 18));
    out[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3F));
    out[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

/* Copies a string value into `buf` (NUL-terminated), decoding escapes to
 * UTF-8. Returns its length, or -1 when it is not a string or does not fit. */
static inline long pc_json_string(pc_json value, char *buf, size_t cap) {
    if (pc_json_type(value) != '"') return -1;
    size_t n = 0;
    const char *last = value.end - 1;
    for (const char *p = value.start + 1; p < last; p++) {
        char piece[4] = {*p};
        size_t width = 1;
        if (*p == '\\') {
            char e = *++p;
            if (e == 'u') {
                uint32_t c = pc_json__hex4(p + 1);
                p += 4;
                if (c >= 0xD800 && c < 0xDC00 && last - p > 6 && p[1] == '\\' && p[2] == 'u') {
                    uint32_t low = pc_json__hex4(p + 3);
                    if (low >= 0xDC00 && low < 0xE000) {
                        c = 0x10000 + ((c - 0xD800) << 10) + (low - 0xDC00);
                        p += 6;
                    }
                }
                width = pc_json__utf8(c, piece);
            } else {
                const char *map = strchr("b\bf\fn\nr\rt\t", e);
                piece[0] = map ? map[1] : e;
            }
        }
        if (n + width >= cap) return -1;
        memcpy(buf + n, piece, width);
        n += width;
    }
    buf[n] = 0;
    return (long)n;
}

/* Whether a string value equals `text` (after decoding escapes; a decoded
 * NUL byte never matches). */
static inline bool pc_json_string_equals(pc_json value, const char *text) {
    char buf[1024];
    long n = pc_json_string(value, buf, sizeof buf);
    return n >= 0 && (size_t)n == strlen(text) && memcmp(buf, text, (size_t)n) == 0;
}

/* Finds the member `name` of an object. */
static inline bool pc_json_get(pc_json object, const char *name, pc_json *out) {
    if (pc_json_type(object) != '{') return false;
    pc_json cursor = {0}, key;
    while (pc_json_next(object, &cursor, &key)) {
        if (pc_json_string_equals(key, name)) {
            *out = cursor;
            return true;
        }
    }
    return false;
}

#endif
