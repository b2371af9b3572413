# Reads the small YAML subset of NoCloud meta-data and #cloud-config user-data and
# prints "key<TAB>value" for top-level scalars and "key<TAB>item" for each item of a
# top-level list (public-keys, ssh_authorized_keys). Quotes around values are removed.
function unquote(value) {
    sub(/^[ \t]+/, "", value)
    sub(/[ \t\r]+$/, "", value)
    if (value ~ /^".*"$/ || value ~ /^'.*'$/)
        value = substr(value, 2, length(value) - 2)
    return value
}

/^[ \t]*#/ || /^[ \t]*$/ { next }

/^[A-Za-z0-9_.-]+:/ {
    key = $0
    sub(/:.*/, "", key)
    value = $0
    sub(/^[^:]*:/, "", value)
    value = unquote(value)
    if (value == "" || value == "|" || value == ">") {
        current = key
    } else {
        current = ""
        printf "%s\t%s\n", key, value
    }
    next
}

current != "" && /^[ \t]*-[ \t]/ {
    item = $0
    sub(/^[ \t]*-[ \t]+/, "", item)
    printf "%s\t%s\n", current, unquote(item)
    next
}

current != "" && /^[ \t]+[A-Za-z0-9_.-]+:[ \t]/ {
    # a mapping under the key (name: value), as in public-keys: {name: key}
    item = $0
    sub(/^[ \t]+[^:]*:/, "", item)
    printf "%s\t%s\n", current, unquote(item)
    next
}
