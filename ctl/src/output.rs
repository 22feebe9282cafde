//! How rctl prints what it lists and inspects: one `-o table|json|yaml` flag shared by every
//! listing and `inspect` command, and one [`print`] that renders either the command's table or
//! the full object.
//!
//! Invariants: JSON and YAML are the same value (the object a command builds, with the field
//! names documented in the README's CLI section), never a rendering of the table; a listing is
//! always a JSON array / YAML sequence, even when empty; the table goes to stdout, warnings to
//! stderr. Secrets' values never reach these objects (their builders take metadata only).

use std::io::Write;

use serde::Serialize;

/// `-o`: how a listing or an `inspect` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum OutputFormat {
    /// Aligned columns for a person (inspect: `FIELD  VALUE` lines).
    #[default]
    Table,
    /// The full objects, pretty-printed JSON (an array for a listing).
    Json,
    /// The same objects as YAML.
    Yaml,
}

/// Renders `value` as `format` into `out`; `table` draws the table form.
pub fn render<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    format: OutputFormat,
    value: &T,
    table: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, value)?;
            writeln!(out)?;
        }
        OutputFormat::Yaml => {
            // serde_yaml prints scalars of a Value without a document marker; a listing is a
            // sequence, an object a mapping: both parse back with any YAML reader.
            out.write_all(serde_yaml::to_string(value)?.as_bytes())?;
        }
        OutputFormat::Table => table(out)?,
    }
    Ok(())
}

/// [`render`] to stdout.
pub fn print<T: Serialize + ?Sized>(
    format: OutputFormat,
    value: &T,
    table: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    render(&mut out, format, value, table)?;
    out.flush()?;
    Ok(())
}

/// Prints one object (`inspect`): its table form is [`write_fields`].
pub fn print_object(format: OutputFormat, value: &serde_json::Value) -> anyhow::Result<()> {
    print(format, value, |w| write_fields(w, value))
}

/// Rows as aligned columns, the header first; the last column is not padded.
pub fn write_table(
    w: &mut dyn Write,
    header: &[&str],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let pad = widths.get(i).copied().unwrap_or(0);
                s.push_str(c);
                for _ in c.chars().count()..pad {
                    s.push(' ');
                }
                s.push_str("  ");
            }
        }
        writeln!(w, "{}", s.trim_end())
    };
    line(header.to_vec())?;
    for r in rows {
        line(r.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

/// An object as `FIELD  VALUE` lines: scalars as they are, nested values as compact JSON.
pub fn write_fields(w: &mut dyn Write, value: &serde_json::Value) -> std::io::Result<()> {
    let Some(map) = value.as_object() else {
        return writeln!(w, "{}", scalar(value));
    };
    let rows: Vec<Vec<String>> = map
        .iter()
        .map(|(k, v)| vec![k.clone(), scalar(v)])
        .collect();
    write_table(w, &["FIELD", "VALUE"], &rows)
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rendered(format: OutputFormat, v: &serde_json::Value) -> String {
        let mut out = Vec::new();
        render(&mut out, format, v, |w| {
            write_table(w, &["NAME", "N"], &[vec!["web".into(), "3".into()]])
        })
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_is_the_full_object_not_the_table() {
        let v = json!([{"name": "web", "spec": {"replicas": 3}}]);
        let text = rendered(OutputFormat::Json, &v);
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
        assert!(!text.contains("NAME"), "{text}");
    }

    #[test]
    fn yaml_parses_back_to_the_same_value() {
        let v = json!([{"name": "web", "labels": {"a": "b"}, "n": 3, "none": null}]);
        let text = rendered(OutputFormat::Yaml, &v);
        let back: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back, v);
        let empty = rendered(OutputFormat::Yaml, &json!([]));
        let back: serde_json::Value = serde_yaml::from_str(&empty).unwrap();
        assert_eq!(back, json!([]), "an empty listing is an empty sequence");
    }

    #[test]
    fn table_is_aligned_columns() {
        let text = rendered(OutputFormat::Table, &json!([]));
        assert_eq!(text, "NAME  N\nweb   3\n");
    }

    #[test]
    fn an_object_as_a_table_is_field_value_lines() {
        let mut out = Vec::new();
        write_fields(
            &mut out,
            &json!({"name": "web", "ports": [80], "owner": null}),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("FIELD  VALUE\n"), "{text}");
        assert!(text.contains("name   web\n"), "{text}");
        assert!(text.contains("ports  [80]\n"), "{text}");
        assert!(text.contains("owner  -\n"), "{text}");
    }

    #[test]
    fn wide_characters_count_once() {
        let mut out = Vec::new();
        write_table(&mut out, &["A", "B"], &[vec!["é".into(), "x".into()]]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "A  B\né  x\n");
    }
}
