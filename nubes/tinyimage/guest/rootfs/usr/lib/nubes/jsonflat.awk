# Flattens a JSON document into "path<TAB>value" lines, one per string, number or
# literal; paths join object keys and array indexes with dots (public_keys.mykey,
# keys.0.data). Newlines inside strings become spaces. Enough for metadata documents.
{ text = text $0 "\n" }

END {
    pos = 1
    size = length(text)
    parse_value("")
}

function skip_space() {
    while (pos <= size && index(" \t\r\n", substr(text, pos, 1)) > 0)
        pos++
}

function join(path, key) {
    return path == "" ? key : path "." key
}

function parse_value(path,    c) {
    skip_space()
    c = substr(text, pos, 1)
    if (c == "{")
        parse_object(path)
    else if (c == "[")
        parse_array(path)
    else if (c == "\"")
        emit(path, parse_string())
    else
        emit(path, parse_literal())
}

function parse_object(path,    key, c) {
    pos++
    skip_space()
    if (substr(text, pos, 1) == "}") { pos++; return }
    while (pos <= size) {
        skip_space()
        key = parse_string()
        skip_space()
        pos++  # the colon
        parse_value(join(path, key))
        skip_space()
        c = substr(text, pos, 1)
        pos++
        if (c != ",") return
    }
}

function parse_array(path,    index_, c) {
    pos++
    skip_space()
    if (substr(text, pos, 1) == "]") { pos++; return }
    index_ = 0
    while (pos <= size) {
        parse_value(join(path, index_))
        index_++
        skip_space()
        c = substr(text, pos, 1)
        pos++
        if (c != ",") return
    }
}

function parse_string(    out, c, escaped) {
    pos++  # the opening quote
    out = ""
    while (pos <= size) {
        c = substr(text, pos, 1)
        if (c == "\"") { pos++; return out }
        if (c == "\\") {
            escaped = substr(text, pos + 1, 1)
            pos += 2
            if (escaped == "n" || escaped == "r" || escaped == "t") out = out " "
            else if (escaped == "u") { out = out "?"; pos += 4 }
            else if (escaped == "b" || escaped == "f") out = out
            else out = out escaped
            continue
        }
        out = out c
        pos++
    }
    return out
}

function parse_literal(    start) {
    start = pos
    while (pos <= size && index(",}] \t\r\n", substr(text, pos, 1)) == 0)
        pos++
    return substr(text, start, pos - start)
}

function emit(path, value) {
    gsub(/^ +| +$/, "", value)
    printf "%s\t%s\n", path, value
}
