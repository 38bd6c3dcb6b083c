//! `kind = "parquet"`: files in the layout Hugging Face datasets publish image sets in: an
//! `image` column, a struct of `bytes` (the encoded image) and `path`, and an integer `label`.
//! Listing reads only the metadata and the label column; an image's bytes are read from its row
//! group when it is decoded. A file with another schema is skipped with the reason.

use std::fs::File;
use std::path::Path;

use arrow_array::{Array, BinaryArray, Int32Array, Int64Array, LargeBinaryArray, StructArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::arrow::ProjectionMask;

use super::{shard_name, ImageRef, Locator, Skipped};
use crate::config::{LabelSource, SourceConfig};

fn builder(file: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, String> {
    let f = File::open(file).map_err(|e| format!("cannot open: {e}"))?;
    ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| format!("not a readable Parquet file: {e}"))
}

/// Checks the Hugging Face layout; returns whether a `label` column exists.
fn check_schema(b: &ParquetRecordBatchReaderBuilder<File>) -> Result<bool, String> {
    let schema = b.schema();
    let image_ok = schema
        .field_with_name("image")
        .ok()
        .is_some_and(|f| match f.data_type() {
            DataType::Struct(children) => children.iter().any(|c| {
                c.name() == "bytes"
                    && matches!(c.data_type(), DataType::Binary | DataType::LargeBinary)
            }),
            _ => false,
        });
    if !image_ok {
        let found: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| format!("{}: {}", f.name(), f.data_type()))
            .collect();
        return Err(format!(
            "wrong schema for a parquet image source: expected an `image` struct with binary `bytes` (and `path`) and an integer `label` (the Hugging Face layout), found {}",
            found.join(", ")
        ));
    }
    Ok(schema.field_with_name("label").is_ok())
}

/// Lists the rows of one file into `out`.
pub fn list(file: &Path, cfg: &SourceConfig, out: &mut Vec<ImageRef>, skipped: &mut Vec<Skipped>) {
    let name = shard_name(file);
    let result = (|| -> Result<(), String> {
        let b = builder(file)?;
        let has_label = check_schema(&b)?;
        let rows = b.metadata().file_metadata().num_rows().max(0) as u64;
        let labels: Vec<Option<i64>> = if cfg.labels == LabelSource::Source && has_label {
            let mask = ProjectionMask::columns(b.parquet_schema(), ["label"]);
            let reader = b.with_projection(mask).build().map_err(|e| e.to_string())?;
            let mut v = Vec::with_capacity(rows as usize);
            for batch in reader {
                let batch = batch.map_err(|e| format!("cannot read the label column: {e}"))?;
                let col = batch.column(0);
                if let Some(a) = col.as_any().downcast_ref::<Int64Array>() {
                    v.extend(a.iter());
                } else if let Some(a) = col.as_any().downcast_ref::<Int32Array>() {
                    v.extend(a.iter().map(|x| x.map(i64::from)));
                } else {
                    return Err(format!(
                        "label column is {}, not an integer",
                        col.data_type()
                    ));
                }
            }
            v
        } else {
            vec![None; rows as usize]
        };
        for (row, label) in labels.into_iter().enumerate() {
            out.push(ImageRef {
                seq: 0,
                id: format!("{name}#{row}"),
                loc: Locator::ParquetRow {
                    file: file.to_path_buf(),
                    row: row as u64,
                },
                label,
            });
        }
        Ok(())
    })();
    if let Err(reason) = result {
        skipped.push(Skipped { id: name, reason });
    }
}

/// Reads the encoded image of row `row` of `file`.
pub fn read_row(file: &Path, row: u64) -> Result<Vec<u8>, String> {
    let b = builder(file)?;
    check_schema(&b)?;
    // find the row group holding the row, and the row's offset in it
    let mut first = 0u64;
    let mut group = None;
    for (i, rg) in b.metadata().row_groups().iter().enumerate() {
        let n = rg.num_rows().max(0) as u64;
        if row < first + n {
            group = Some(i);
            break;
        }
        first += n;
    }
    let group = group.ok_or_else(|| format!("row {row} is past the end of the file"))?;
    let mask = ProjectionMask::columns(b.parquet_schema(), ["image.bytes"]);
    let selection = RowSelection::from(vec![
        RowSelector::skip((row - first) as usize),
        RowSelector::select(1),
    ]);
    let mut reader = b
        .with_row_groups(vec![group])
        .with_projection(mask)
        .with_row_selection(selection)
        .build()
        .map_err(|e| e.to_string())?;
    let batch = reader
        .next()
        .ok_or("row not found")?
        .map_err(|e| format!("cannot read the row: {e}"))?;
    let image = batch
        .column(0)
        .as_any()
        .downcast_ref::<StructArray>()
        .ok_or("image column is not a struct")?;
    let bytes = image.column_by_name("bytes").ok_or("image has no bytes")?;
    if bytes.is_null(0) {
        return Err("the row's image bytes are null".into());
    }
    if let Some(a) = bytes.as_any().downcast_ref::<BinaryArray>() {
        Ok(a.value(0).to_vec())
    } else if let Some(a) = bytes.as_any().downcast_ref::<LargeBinaryArray>() {
        Ok(a.value(0).to_vec())
    } else {
        Err("image bytes are not binary".into())
    }
}
