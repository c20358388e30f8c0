//! How `assert.equal` compares Lua values and shows what differs: deep equality of
//! tables with one line per differing path, a line diff for multi-line strings, and
//! readable one-line forms of values.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt::Write;

use mlua::{Function, Lua, Table, Value};

/// How far into nested tables values are compared; deeper tables compare by identity.
const MAX_DEPTH: usize = 100;
/// How many differing paths are listed; the rest are counted.
const MAX_PATHS: usize = 30;
/// Lines of context around each change of a line diff.
const CONTEXT: usize = 3;
/// Above this many cells the line diff stops looking for common lines in the changed
/// middle and shows it as removed and added.
const MAX_DIFF_CELLS: usize = 4_000_000;
/// Length above which a value's one-line form is cut.
const SHOW_LIMIT: usize = 300;

/// What `assert.equal` reports when its values differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// One line: "expected 3, got 4", "tables differ at 2 paths", ...
    pub summary: String,
    /// Several lines showing where they differ (paths, or a line diff), if that says more
    /// than the summary.
    pub diff: Option<String>,
    /// The expected value, in one line.
    pub expected: String,
    /// The actual value, in one line.
    pub actual: String,
}

/// Compares `expected` with `actual`: tables by content, recursively (keys compared raw,
/// metatables ignored, cycles allowed), everything else with Lua's `==` (so `__eq`
/// counts, and 1 equals 1.0), and NaN equal to NaN. `None` when they are equal.
pub fn compare(lua: &Lua, expected: &Value, actual: &Value) -> mlua::Result<Option<Difference>> {
    let shower = Shower::new(lua)?;
    let mut walk = Walk {
        shower: &shower,
        seen: HashSet::new(),
        differences: Vec::new(),
        total: 0,
    };
    walk.compare(&mut String::new(), expected, actual, 0)?;
    if walk.total == 0 {
        return Ok(None);
    }
    let expected_text = shower.show(expected)?;
    let actual_text = shower.show(actual)?;
    let (summary, diff) = match (expected, actual) {
        (Value::String(e), Value::String(a)) => {
            let (e, a) = (e.to_string_lossy(), a.to_string_lossy());
            string_difference(&e, &a)
        }
        (Value::Table(_), Value::Table(_)) => {
            let mut lines = walk.differences.join("\n");
            if walk.total > walk.differences.len() {
                let _ = write!(
                    lines,
                    "\n… and {} more",
                    walk.total - walk.differences.len()
                );
            }
            let _ = write!(
                lines,
                "\nexpected: {expected_text}\nactual:   {actual_text}"
            );
            let places = if walk.total == 1 { "path" } else { "paths" };
            (
                format!("tables differ at {} {places}", walk.total),
                Some(lines),
            )
        }
        _ => (scalar_summary(&shower, expected, actual)?, None),
    };
    Ok(Some(Difference {
        summary,
        diff,
        expected: expected_text,
        actual: actual_text,
    }))
}

/// The one-line form of `value`, as assertion messages show it.
pub fn show(lua: &Lua, value: &Value) -> mlua::Result<String> {
    Shower::new(lua)?.show(value)
}

struct Walk<'a> {
    shower: &'a Shower,
    /// Pairs of tables being compared or already compared, by address: a cycle compares
    /// equal where it closes.
    seen: HashSet<(usize, usize)>,
    differences: Vec<String>,
    total: usize,
}

impl Walk<'_> {
    fn differ(&mut self, line: String) {
        self.total += 1;
        if self.differences.len() < MAX_PATHS {
            self.differences.push(line);
        }
    }

    fn compare(
        &mut self,
        path: &mut String,
        expected: &Value,
        actual: &Value,
        depth: usize,
    ) -> mlua::Result<()> {
        if let (Value::Table(e), Value::Table(a)) = (expected, actual) {
            if depth < MAX_DEPTH {
                return self.compare_tables(path, e, a, depth);
            }
        }
        if leaf_equal(expected, actual)? {
            return Ok(());
        }
        if path.is_empty() {
            // Two values that are not both tables: `compare` describes them itself.
            self.total += 1;
            return Ok(());
        }
        let at = path.as_str();
        let line = match (expected, actual) {
            (Value::String(e), Value::String(a))
                if e.as_bytes().contains(&b'\n') || a.as_bytes().contains(&b'\n') =>
            {
                let diff = line_diff(&e.to_string_lossy(), &a.to_string_lossy());
                format!("{at}: strings differ:\n{}", indent(&diff, "    "))
            }
            (_, Value::Nil) => format!(
                "{at}: expected {}, got nil (missing)",
                self.shower.show(expected)?
            ),
            (Value::Nil, _) => format!(
                "{at}: expected nil, got {} (not expected)",
                self.shower.show(actual)?
            ),
            _ => format!(
                "{at}: expected {}, got {}",
                self.shower.show(expected)?,
                self.shower.show(actual)?
            ),
        };
        self.differ(line);
        Ok(())
    }

    fn compare_tables(
        &mut self,
        path: &mut String,
        expected: &Table,
        actual: &Table,
        depth: usize,
    ) -> mlua::Result<()> {
        if expected == actual {
            return Ok(());
        }
        let pair = (expected.to_pointer() as usize, actual.to_pointer() as usize);
        if !self.seen.insert(pair) {
            return Ok(());
        }
        let mut keys: Vec<Value> = Vec::new();
        for pair in expected.pairs::<Value, Value>() {
            keys.push(pair?.0);
        }
        for pair in actual.pairs::<Value, Value>() {
            let (key, _) = pair?;
            if expected.raw_get::<Value>(key.clone())?.is_nil() {
                keys.push(key);
            }
        }
        keys.sort_by(key_order);
        for key in keys {
            let e: Value = expected.raw_get(key.clone())?;
            let a: Value = actual.raw_get(key.clone())?;
            let len = path.len();
            push_key(path, &key, self.shower)?;
            self.compare(path, &e, &a, depth + 1)?;
            path.truncate(len);
        }
        Ok(())
    }
}

/// Lua's `==` (with `__eq`), except that NaN equals NaN.
fn leaf_equal(expected: &Value, actual: &Value) -> mlua::Result<bool> {
    if let (Value::Number(e), Value::Number(a)) = (expected, actual) {
        if e.is_nan() && a.is_nan() {
            return Ok(true);
        }
    }
    if expected == actual {
        return Ok(true);
    }
    match (expected, actual) {
        (Value::Table(_), Value::Table(_)) | (Value::UserData(_), Value::UserData(_)) => {
            expected.equals(actual)
        }
        _ => Ok(false),
    }
}

fn scalar_summary(shower: &Shower, expected: &Value, actual: &Value) -> mlua::Result<String> {
    let (e, a) = (shower.show(expected)?, shower.show(actual)?);
    if expected.type_name() == actual.type_name() {
        Ok(format!("expected {e}, got {a}"))
    } else {
        Ok(format!(
            "expected {e} ({}), got {a} ({})",
            article(expected),
            article(actual)
        ))
    }
}

fn article(value: &Value) -> String {
    let name = match value {
        Value::Integer(_) | Value::Number(_) => "number",
        other => other.type_name(),
    };
    match name {
        "integer" | "userdata" => format!("an {name}"),
        "nil" => "nil".into(),
        _ => format!("a {name}"),
    }
}

/// Summary and diff of two strings: a line diff when either has several lines,
/// otherwise both, with where they first differ.
fn string_difference(expected: &str, actual: &str) -> (String, Option<String>) {
    if expected.contains('\n') || actual.contains('\n') {
        let (removed, added) = changed_lines(expected, actual);
        return (
            format!(
                "strings differ: {removed} expected line{} missing, {added} unexpected \
                 (- expected, + actual)",
                plural(removed),
            ),
            Some(line_diff(expected, actual)),
        );
    }
    let at = expected
        .bytes()
        .zip(actual.bytes())
        .position(|(e, a)| e != a)
        .unwrap_or(expected.len().min(actual.len()));
    let e = quote(expected, usize::MAX);
    let a = quote(actual, usize::MAX);
    if e.chars().count() + a.chars().count() <= 70 {
        return (format!("expected {e}, got {a}"), None);
    }
    // Long strings: both around the first difference, and a caret under it.
    let start = floor_char_boundary(expected, at.saturating_sub(30))
        .min(floor_char_boundary(actual, at.saturating_sub(30)));
    let excerpt = |s: &str| {
        let end = floor_char_boundary(s, (at + 30).min(s.len()));
        let mut text = quote(&s[start..end], usize::MAX);
        if start > 0 {
            text.insert(0, '…');
        }
        if end < s.len() {
            text.push('…');
        }
        text
    };
    let (e_excerpt, a_excerpt) = (excerpt(expected), excerpt(actual));
    let caret_at = quote(
        &expected[start..floor_char_boundary(expected, at)],
        usize::MAX,
    )
    .chars()
    .count()
        - 1
        + usize::from(start > 0);
    let diff = format!(
        "expected: {e_excerpt}\nactual:   {a_excerpt}\n          {}^ byte {}",
        " ".repeat(caret_at),
        at + 1
    );
    (
        format!(
            "strings differ at byte {} (expected {} bytes, got {})",
            at + 1,
            expected.len(),
            actual.len()
        ),
        Some(diff),
    )
}

fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|l| format!("{prefix}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Same,
    Removed,
    Added,
}

/// The edit from `expected`'s lines to `actual`'s: common lines, lines only in
/// `expected` and lines only in `actual`, as (op, expected index, actual index).
fn line_ops(expected: &[&str], actual: &[&str]) -> Vec<(Op, usize, usize)> {
    let prefix = expected
        .iter()
        .zip(actual)
        .take_while(|(e, a)| e == a)
        .count();
    let suffix = expected[prefix..]
        .iter()
        .rev()
        .zip(actual[prefix..].iter().rev())
        .take_while(|(e, a)| e == a)
        .count();
    let e_mid = &expected[prefix..expected.len() - suffix];
    let a_mid = &actual[prefix..actual.len() - suffix];
    let mut ops: Vec<(Op, usize, usize)> = (0..prefix).map(|i| (Op::Same, i, i)).collect();
    let (n, m) = (e_mid.len(), a_mid.len());
    if (n + 1).saturating_mul(m + 1) <= MAX_DIFF_CELLS {
        // Longest common subsequence, from the end: lcs[i][j] for e_mid[i..], a_mid[j..].
        let width = m + 1;
        let mut lcs = vec![0u32; (n + 1) * width];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i * width + j] = if e_mid[i] == a_mid[j] {
                    lcs[(i + 1) * width + j + 1] + 1
                } else {
                    lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            if i < n && j < m && e_mid[i] == a_mid[j] {
                ops.push((Op::Same, prefix + i, prefix + j));
                i += 1;
                j += 1;
            } else if j == m || (i < n && lcs[(i + 1) * width + j] >= lcs[i * width + j + 1]) {
                ops.push((Op::Removed, prefix + i, prefix + j));
                i += 1;
            } else {
                ops.push((Op::Added, prefix + i, prefix + j));
                j += 1;
            }
        }
    } else {
        ops.extend((0..n).map(|i| (Op::Removed, prefix + i, prefix)));
        ops.extend((0..m).map(|j| (Op::Added, prefix + n, prefix + j)));
    }
    let (e_end, a_end) = (expected.len() - suffix, actual.len() - suffix);
    ops.extend((0..suffix).map(|k| (Op::Same, e_end + k, a_end + k)));
    ops
}

/// Both strings without their last newline when both end with one: it would only add an
/// empty common line at the end of every diff.
fn without_common_final_newline<'a>(expected: &'a str, actual: &'a str) -> (&'a str, &'a str) {
    match (expected.strip_suffix('\n'), actual.strip_suffix('\n')) {
        (Some(e), Some(a)) => (e, a),
        _ => (expected, actual),
    }
}

fn changed_lines(expected: &str, actual: &str) -> (usize, usize) {
    let (expected, actual) = without_common_final_newline(expected, actual);
    let e: Vec<&str> = expected.split('\n').collect();
    let a: Vec<&str> = actual.split('\n').collect();
    let ops = line_ops(&e, &a);
    (
        ops.iter().filter(|o| o.0 == Op::Removed).count(),
        ops.iter().filter(|o| o.0 == Op::Added).count(),
    )
}

/// A unified line diff from `expected` to `actual`: hunks headed `@@ -l,n +l,n @@`, lines
/// marked `- ` (only expected), `+ ` (only actual) and `  ` (both), with 3 lines of
/// context. Control characters other than tab are shown escaped, so a stray `\r` or
/// trailing space is visible.
pub fn line_diff(expected: &str, actual: &str) -> String {
    let (expected, actual) = without_common_final_newline(expected, actual);
    let e: Vec<&str> = expected.split('\n').collect();
    let a: Vec<&str> = actual.split('\n').collect();
    let ops = line_ops(&e, &a);
    let changed: Vec<usize> = (0..ops.len()).filter(|&k| ops[k].0 != Op::Same).collect();
    let mut out = String::new();
    let mut k = 0;
    while k < changed.len() {
        // One hunk: changes closer than twice the context go together.
        let first = changed[k];
        let mut last = first;
        while k + 1 < changed.len() && changed[k + 1] <= last + 2 * CONTEXT + 1 {
            k += 1;
            last = changed[k];
        }
        k += 1;
        let start = first.saturating_sub(CONTEXT);
        let end = (last + CONTEXT + 1).min(ops.len());
        let hunk = &ops[start..end];
        let e_count = hunk.iter().filter(|o| o.0 != Op::Added).count();
        let a_count = hunk.iter().filter(|o| o.0 != Op::Removed).count();
        let _ = writeln!(
            out,
            "@@ -{},{e_count} +{},{a_count} @@",
            hunk[0].1 + 1,
            hunk[0].2 + 1
        );
        for &(op, i, j) in hunk {
            let (mark, line) = match op {
                Op::Same => ("  ", e[i]),
                Op::Removed => ("- ", e[i]),
                Op::Added => ("+ ", a[j]),
            };
            let _ = writeln!(out, "{mark}{}", visible(line));
        }
    }
    out.pop();
    out
}

/// `line` with control characters other than tab escaped, and trailing spaces marked.
fn visible(line: &str) -> String {
    let mut out = String::new();
    for c in line.chars() {
        match c {
            '\t' => out.push('\t'),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\{}", c as u32);
            }
            c => out.push(c),
        }
    }
    let trimmed = out.trim_end_matches(' ').len();
    if trimmed < out.len() {
        let spaces = out.len() - trimmed;
        out.truncate(trimmed);
        let _ = write!(
            out,
            "{}⟵ {spaces} trailing space{}",
            " ".repeat(spaces),
            plural(spaces)
        );
    }
    out
}

/// A Lua string literal for `s` ("..." with escapes), cut after `limit` characters.
pub fn quote(s: &str, limit: usize) -> String {
    let mut out = String::from("\"");
    for (count, c) in s.chars().enumerate() {
        if count >= limit {
            let _ = write!(out, "…\" ({} bytes)", s.len());
            return out;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\{}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

const KEYWORDS: &[&str] = &[
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in",
    "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
];

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !KEYWORDS.contains(&s)
}

/// Appends the path step for `key`: `.name`, `[1]`, `["a b"]`, `[true]`.
fn push_key(path: &mut String, key: &Value, shower: &Shower) -> mlua::Result<()> {
    match key {
        Value::String(s) => {
            let s = s.to_string_lossy();
            if is_identifier(&s) {
                path.push('.');
                path.push_str(&s);
            } else {
                let _ = write!(path, "[{}]", quote(&s, 40));
            }
        }
        other => {
            let _ = write!(path, "[{}]", shower.show(other)?);
        }
    }
    Ok(())
}

/// Orders table keys for display: numbers first (ascending), then strings, then the rest
/// by type.
fn key_order(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Integer(_) | Value::Number(_) => 0,
            Value::String(_) => 1,
            Value::Boolean(_) => 2,
            _ => 3,
        }
    }
    fn number(v: &Value) -> f64 {
        match v {
            Value::Integer(i) => *i as f64,
            Value::Number(n) => *n,
            _ => 0.0,
        }
    }
    rank(a).cmp(&rank(b)).then_with(|| match (a, b) {
        (Value::String(x), Value::String(y)) => x.as_bytes().cmp(&y.as_bytes()),
        (Value::Boolean(x), Value::Boolean(y)) => x.cmp(y),
        _ if rank(a) == 0 => number(a).total_cmp(&number(b)),
        _ => a
            .type_name()
            .cmp(b.type_name())
            .then_with(|| (a.to_pointer() as usize).cmp(&(b.to_pointer() as usize))),
    })
}

/// Makes one-line forms of values: Lua literals for scalars and tables (cut at
/// [`SHOW_LIMIT`]), `tostring` for the rest.
struct Shower {
    tostring: Function,
}

impl Shower {
    fn new(lua: &Lua) -> mlua::Result<Shower> {
        Ok(Shower {
            tostring: lua.globals().get("tostring")?,
        })
    }

    fn show(&self, value: &Value) -> mlua::Result<String> {
        let mut out = String::new();
        self.write(&mut out, value, 0, &mut Vec::new())?;
        if out.chars().count() > SHOW_LIMIT {
            let cut: String = out.chars().take(SHOW_LIMIT).collect();
            out = format!("{cut}…");
        }
        Ok(out)
    }

    fn write(
        &self,
        out: &mut String,
        value: &Value,
        depth: usize,
        open: &mut Vec<usize>,
    ) -> mlua::Result<()> {
        if out.len() > SHOW_LIMIT * 2 {
            return Ok(());
        }
        match value {
            Value::Nil => out.push_str("nil"),
            Value::Boolean(b) => {
                let _ = write!(out, "{b}");
            }
            Value::Integer(i) => {
                let _ = write!(out, "{i}");
            }
            Value::String(s) => out.push_str(&quote(&s.to_string_lossy(), 120)),
            Value::Table(t) => self.write_table(out, t, depth, open)?,
            other => {
                let text: String = self.tostring.call(other.clone())?;
                out.push_str(&text);
            }
        }
        Ok(())
    }

    fn write_table(
        &self,
        out: &mut String,
        table: &Table,
        depth: usize,
        open: &mut Vec<usize>,
    ) -> mlua::Result<()> {
        let address = table.to_pointer() as usize;
        if open.contains(&address) {
            out.push_str("<cycle>");
            return Ok(());
        }
        if depth >= 3 {
            out.push_str(if table.is_empty() { "{}" } else { "{…}" });
            return Ok(());
        }
        let mut entries: Vec<(Value, Value)> = Vec::new();
        for pair in table.pairs::<Value, Value>() {
            entries.push(pair?);
        }
        if entries.is_empty() {
            out.push_str("{}");
            return Ok(());
        }
        entries.sort_by(|a, b| key_order(&a.0, &b.0));
        open.push(address);
        out.push_str("{ ");
        let mut next_index = 1;
        for (n, (key, value)) in entries.iter().enumerate() {
            if n > 0 {
                out.push_str(", ");
            }
            if out.len() > SHOW_LIMIT * 2 {
                out.push('…');
                break;
            }
            match key {
                Value::Integer(i) if *i == next_index => next_index += 1,
                Value::String(s) if is_identifier(&s.to_string_lossy()) => {
                    let _ = write!(out, "{} = ", s.to_string_lossy());
                }
                other => {
                    out.push('[');
                    self.write(out, other, depth + 1, open)?;
                    out.push_str("] = ");
                }
            }
            self.write(out, value, depth + 1, open)?;
        }
        out.push_str(" }");
        open.pop();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn differ(code: &str) -> Option<Difference> {
        let lua = Lua::new();
        let (e, a): (Value, Value) = lua.load(code).eval().unwrap();
        compare(&lua, &e, &a).unwrap()
    }

    #[test]
    fn equal_values_have_no_difference() {
        for code in [
            "return 1, 1.0",
            "return 'a', 'a'",
            "return nil, nil",
            "return 0/0, 0/0",
            "return { 1, { x = 'y' }, [true] = false }, { 1, { x = 'y' }, [true] = false }",
            "local a = {} a.self = a local b = {} b.self = b return a, b",
            "local mt = { __eq = function() return true end } \
             return setmetatable({}, mt), setmetatable({}, mt)",
        ] {
            assert_eq!(differ(code), None, "{code}");
        }
    }

    #[test]
    fn scalars_say_what_was_expected_and_what_came() {
        let d = differ("return 3, 4").unwrap();
        assert_eq!(d.summary, "expected 3, got 4");
        assert_eq!(d.diff, None);
        let d = differ("return 3, '3'").unwrap();
        assert_eq!(d.summary, "expected 3 (a number), got \"3\" (a string)");
        let d = differ("return nil, false").unwrap();
        assert_eq!(d.summary, "expected nil (nil), got false (a boolean)");
        let d = differ("return 'web', 'db'").unwrap();
        assert_eq!(d.summary, "expected \"web\", got \"db\"");
    }

    #[test]
    fn tables_list_each_differing_path() {
        let d = differ(
            "return { name = 'web', vcpus = 1, disks = { { path = 'a.img' } }, [2] = 'x' }, \
                    { name = 'web', vcpus = 2, disks = { { path = 'b.img' } }, extra = true }",
        )
        .unwrap();
        assert_eq!(d.summary, "tables differ at 4 paths");
        assert_eq!(
            d.diff.unwrap(),
            "[2]: expected \"x\", got nil (missing)\n\
             .disks[1].path: expected \"a.img\", got \"b.img\"\n\
             .extra: expected nil, got true (not expected)\n\
             .vcpus: expected 1, got 2\n\
             expected: { [2] = \"x\", disks = { { path = \"a.img\" } }, name = \"web\", vcpus = 1 }\n\
             actual:   { disks = { { path = \"b.img\" } }, extra = true, name = \"web\", vcpus = 2 }"
        );
        let d = differ("return { ['a b'] = 1 }, { ['a b'] = 2 }").unwrap();
        assert!(d.diff.unwrap().starts_with("[\"a b\"]: expected 1, got 2"));
    }

    #[test]
    fn many_differences_are_counted_not_all_listed() {
        let d = differ("local a, b = {}, {} for i = 1, 100 do a[i] = i b[i] = -i end return a, b")
            .unwrap();
        assert_eq!(d.summary, "tables differ at 100 paths");
        let diff = d.diff.unwrap();
        assert_eq!(
            diff.lines().filter(|l| l.starts_with('[')).count(),
            MAX_PATHS
        );
        assert!(diff.contains("… and 70 more"), "{diff}");
    }

    #[test]
    fn multi_line_strings_get_a_line_diff() {
        let d = differ(
            "return 'hello\\ncount 1\\ncount 2\\ncount 3\\n', 'hello\\ncount 1\\ncount 3\\ncount 4\\n'",
        )
        .unwrap();
        assert_eq!(
            d.summary,
            "strings differ: 1 expected line missing, 1 unexpected (- expected, + actual)"
        );
        assert_eq!(
            d.diff.unwrap(),
            "@@ -1,4 +1,4 @@\n  hello\n  count 1\n- count 2\n  count 3\n+ count 4"
        );
        // Inside a table, the line diff is under the path.
        let d = differ("return { log = 'a\\nb' }, { log = 'a\\nc' }").unwrap();
        assert!(d
            .diff
            .unwrap()
            .starts_with(".log: strings differ:\n    @@ -1,2 +1,2 @@\n      a\n    - b\n    + c"),);
    }

    #[test]
    fn distant_changes_are_separate_hunks_and_invisible_characters_show() {
        let expected: Vec<String> = (1..=20).map(|i| format!("line {i}")).collect();
        let mut actual = expected.clone();
        actual[1] = "line 2 ".into();
        actual[17] = "line 18\r".into();
        let diff = line_diff(&expected.join("\n"), &actual.join("\n"));
        assert_eq!(
            diff,
            "@@ -1,5 +1,5 @@\n  line 1\n- line 2\n+ line 2 ⟵ 1 trailing space\n  line 3\n  line 4\n  line 5\n\
             @@ -15,6 +15,6 @@\n  line 15\n  line 16\n  line 17\n- line 18\n+ line 18\\r\n  line 19\n  line 20"
        );
    }

    #[test]
    fn long_single_line_strings_point_at_the_first_difference() {
        let e = "x".repeat(50) + "abc" + &"y".repeat(50);
        let a = "x".repeat(50) + "abd" + &"y".repeat(50);
        let (summary, diff) = string_difference(&e, &a);
        assert_eq!(
            summary,
            "strings differ at byte 53 (expected 103 bytes, got 103)"
        );
        let diff = diff.unwrap();
        let lines: Vec<&str> = diff.lines().collect();
        let caret = lines[2].find('^').unwrap();
        assert_eq!(lines[0].chars().nth(caret), Some('c'), "{diff}");
        assert_eq!(lines[1].chars().nth(caret), Some('d'), "{diff}");
    }

    #[test]
    fn values_are_shown_as_lua_literals() {
        let lua = Lua::new();
        let show_code = |code: &str| {
            let v: Value = lua.load(code).eval().unwrap();
            show(&lua, &v).unwrap()
        };
        assert_eq!(
            show_code("return { 1, 2, x = 'a\\n', [true] = 1.5 }"),
            "{ 1, 2, x = \"a\\n\", [true] = 1.5 }"
        );
        assert_eq!(
            show_code("local t = {} t.t = t return t"),
            "{ t = <cycle> }"
        );
        assert_eq!(show_code("return { { { { 1 } } } }"), "{ { { {…} } } }");
        assert!(show_code("return function() end").starts_with("function: "));
        assert!(show_code("return string.rep('x', 1000)").ends_with("…\" (1000 bytes)"));
    }
}
