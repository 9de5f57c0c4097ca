//! Rendering: one place for tables and JSON.

use anyhow::Result;
use comfy_table::{presets::NOTHING, Table};
use serde::Serialize;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A row of a listing: its columns for tables, its fields (serde) for JSON.
pub trait Row: Serialize {
    const HEADER: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

pub fn print<R: Row>(format: Format, rows: &[R]) -> Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Format::Table => {
            let mut table = Table::new();
            table.load_preset(NOTHING).set_header(R::HEADER.to_vec());
            for row in rows {
                table.add_row(row.cells());
            }
            println!("{table}");
        }
    }
    Ok(())
}

/// One row of a stream, as it happens: a line of columns for people, a JSON object per line for
/// scripts.
pub fn print_line<R: Row>(format: Format, row: &R) -> Result<()> {
    use std::io::Write as _;
    let line = match format {
        Format::Json => serde_json::to_string(row)?,
        Format::Table => row.cells().join("  "),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    // Streamed through a pipe, each event must show up when it happens.
    out.flush()?;
    Ok(())
}
