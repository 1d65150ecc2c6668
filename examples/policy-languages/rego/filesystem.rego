# Guardrails for @modelcontextprotocol/server-filesystem, in Rego.
# Portcullis evaluates `data.mcp` (the whole package) for every message:
# `deny` lists reasons to refuse, `tags` label the audit record.
package mcp

# A tool call from the agent; answers and other methods pass.
call if {
	input.direction == "client-to-server"
	input.method == "tools/call"
}

# The arguments that name files.
path_keys := {"path", "source", "destination"}

paths contains p if {
	some key in path_keys
	p := input.arguments[key]
}

paths contains p if some p in input.arguments.paths

inside(p) if {
	some root in data.roots
	p == root
}

inside(p) if {
	some root in data.roots
	startswith(p, concat("", [trim_right(root, "/"), "/"]))
}

# Cloud keys, private keys and tokens.
secret_patterns := [
	`AKIA[0-9A-Z]{16}`,
	`-----BEGIN [A-Z ]*PRIVATE KEY-----`,
	`gh[pousr]_[A-Za-z0-9]{36}`,
]

# Tool deny-list.
violation contains {"reason": sprintf("tool '%s' is on the deny list", [input.tool]), "tag": "tool-denied"} if {
	call
	input.tool in data.denied_tools
}

# Read-only by annotation, except an allow list.
violation contains {"reason": sprintf("tool '%s' is not declared read-only (readOnlyHint)", [input.tool]), "tag": "write-refused"} if {
	call
	not input.annotations.readOnlyHint == true
	not input.tool in data.allow
}

# Path arguments: strings, inside the roots, never climbing out.
violation contains {"reason": sprintf("argument path '%v' is not a string", [p]), "tag": "bad-arguments"} if {
	call
	some p in paths
	not is_string(p)
}

violation contains {"reason": sprintf("argument path '%s' is outside the allowed roots", [p]), "tag": "bad-arguments"} if {
	call
	some p in paths
	is_string(p)
	not inside(p)
}

violation contains {"reason": sprintf("argument path '%s' climbs out with '..'", [p]), "tag": "bad-arguments"} if {
	call
	some p in paths
	is_string(p)
	".." in split(p, "/")
}

# Secrets in arguments.
violation contains {"reason": "the arguments carry a secret", "tag": "secret-refused"} if {
	call
	text := json.marshal(input.arguments)
	some pattern in secret_patterns
	regex.match(pattern, text)
}

deny contains v.reason if some v in violation

tags contains v.tag if some v in violation

tags contains "checked" if {
	call
	count(violation) == 0
}
