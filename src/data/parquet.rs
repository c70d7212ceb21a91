//! Hugging Face image-classification parquet files: column `image` (a struct
//! `{bytes: binary, path: string}`, as `datasets.Image` stores it) and column `label` (an integer
//! class id, or a bool read as 0/1). Only those two columns are read.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrayRef, GenericBinaryArray, RecordBatch, StructArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::DataError;

/// Rows per record batch when streaming.
const BATCH_SIZE: usize = 1024;

/// One example: the encoded image and its class id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    /// Encoded image bytes (JPEG or PNG).
    pub bytes: Vec<u8>,
    /// The `image.path` field, when present (informational).
    pub path: Option<String>,
    /// Class id.
    pub label: i64,
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// The number of rows of a parquet file, from its footer (no data is read).
pub fn num_rows(path: &Path) -> Result<u64, DataError> {
    let file = File::open(path).map_err(|source| DataError::Io { path: shown(path), source })?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| DataError::Parquet { path: shown(path), message: e.to_string() })?;
    let n = reader.metadata().file_metadata().num_rows();
    u64::try_from(n).map_err(|_| DataError::Parquet {
        path: shown(path),
        message: format!("negative row count {n} in the footer"),
    })
}

/// The number of rows of each row group of a parquet file, from its footer.
pub fn row_group_rows(path: &Path) -> Result<Vec<u64>, DataError> {
    let file = File::open(path).map_err(|source| DataError::Io { path: shown(path), source })?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| DataError::Parquet { path: shown(path), message: e.to_string() })?;
    Ok(reader.metadata().row_groups().iter().map(|g| g.num_rows().max(0) as u64).collect())
}

/// A streaming reader: yields the rows of a file one record batch at a time.
pub struct RowBatches {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    next_row: usize,
}

impl RowBatches {
    /// Open `path` and check that it has usable `image` and `label` columns.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        Self::open_with(path, None)
    }

    /// Like [`open`](Self::open), but only rows `offset..offset + limit` of row group
    /// `row_group` (counted within it): a part of a large file read without decoding the row
    /// groups before it.
    pub fn open_part(
        path: &Path,
        row_group: usize,
        offset: usize,
        limit: usize,
    ) -> Result<Self, DataError> {
        Self::open_with(path, Some((row_group, offset, limit)))
    }

    fn open_with(path: &Path, part: Option<(usize, usize, usize)>) -> Result<Self, DataError> {
        let file =
            File::open(path).map_err(|source| DataError::Io { path: shown(path), source })?;
        let perr = |e: parquet::errors::ParquetError| DataError::Parquet {
            path: shown(path),
            message: e.to_string(),
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(perr)?;
        let schema = builder.schema().clone();
        let index = |name: &str| {
            schema.index_of(name).map_err(|_| DataError::MissingColumn {
                path: shown(path),
                column: name.into(),
                available: schema.fields().iter().map(|f| f.name().clone()).collect(),
            })
        };
        let (image_idx, label_idx) = (index("image")?, index("label")?);
        check_image_type(path, schema.field(image_idx).data_type())?;
        check_label_type(path, schema.field(label_idx).data_type())?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), [image_idx, label_idx]);
        let mut next_row = 0;
        let mut builder = builder.with_projection(mask).with_batch_size(BATCH_SIZE);
        if let Some((group, offset, limit)) = part {
            let groups = builder.metadata().row_groups();
            if group >= groups.len() {
                return Err(DataError::Parquet {
                    path: shown(path),
                    message: format!("no row group {group} (the file has {})", groups.len()),
                });
            }
            let before: i64 = groups[..group].iter().map(|g| g.num_rows()).sum();
            next_row = before as usize + offset;
            builder = builder.with_row_groups(vec![group]).with_offset(offset).with_limit(limit);
        }
        let reader = builder.build().map_err(perr)?;
        Ok(Self { path: path.to_path_buf(), reader, next_row })
    }

    fn convert(&self, batch: &RecordBatch) -> Result<Vec<ImageRow>, DataError> {
        let path = &self.path;
        let column = |name: &str| {
            batch.column_by_name(name).cloned().ok_or_else(|| DataError::MissingColumn {
                path: shown(path),
                column: name.into(),
                available: batch.schema().fields().iter().map(|f| f.name().clone()).collect(),
            })
        };
        let labels = labels_of(path, &column("label")?, self.next_row)?;
        let images = column("image")?;
        let mut rows = Vec::with_capacity(batch.num_rows());
        for (i, label) in labels.into_iter().enumerate() {
            let row = self.next_row + i;
            let (bytes, image_path) = image_at(path, &images, i, row)?;
            rows.push(ImageRow { bytes, path: image_path, label });
        }
        Ok(rows)
    }
}

impl Iterator for RowBatches {
    type Item = Result<Vec<ImageRow>, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = match self.reader.next()? {
            Ok(b) => b,
            Err(e) => {
                return Some(Err(DataError::Parquet {
                    path: shown(&self.path),
                    message: format!("reading rows from {}: {e}", self.next_row),
                }))
            }
        };
        let rows = self.convert(&batch);
        self.next_row += batch.num_rows();
        Some(rows)
    }
}

/// The schema `datasets` writes for an image-classification split: `image: struct<bytes: binary,
/// path: string>, label: int64`, with `metadata` (the `huggingface` features) attached.
pub fn image_schema(metadata: arrow_schema::Metadata) -> arrow_schema::Schema {
    use arrow_schema::{Field, Schema};
    Schema::new(vec![
        Field::new("image", DataType::Struct(image_fields()), true),
        Field::new("label", DataType::Int64, true),
    ])
    .with_metadata(metadata)
}

fn image_fields() -> arrow_schema::Fields {
    use arrow_schema::Field;
    arrow_schema::Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

/// One record batch of [`image_schema`] `schema`: the encoded images (no `path`) and labels.
pub fn image_batch<B: AsRef<[u8]>>(
    schema: &std::sync::Arc<arrow_schema::Schema>,
    images: &[B],
    labels: Vec<i64>,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    use arrow_array::{BinaryArray, Int64Array, StringArray};
    use std::sync::Arc;
    let bytes: ArrayRef = Arc::new(BinaryArray::from_iter_values(images.iter()));
    let paths: ArrayRef = Arc::new(StringArray::from(vec![None::<&str>; images.len()]));
    let image: ArrayRef = Arc::new(StructArray::try_new(image_fields(), vec![bytes, paths], None)?);
    let label: ArrayRef = Arc::new(Int64Array::from(labels));
    RecordBatch::try_new(schema.clone(), vec![image, label])
}

/// Writes `rows` (encoded image, label) as an image-classification parquet file at `path`, in
/// row groups of at most `row_group_rows` rows when given (fixtures and tests).
pub fn write_image_rows(
    path: &Path,
    rows: &[(Vec<u8>, i64)],
    row_group_rows: Option<usize>,
) -> Result<(), DataError> {
    let perr = |message: String| DataError::Parquet { path: shown(path), message };
    let schema = std::sync::Arc::new(image_schema(Default::default()));
    let images: Vec<&[u8]> = rows.iter().map(|r| r.0.as_slice()).collect();
    let batch = image_batch(&schema, &images, rows.iter().map(|r| r.1).collect())
        .map_err(|e| perr(e.to_string()))?;
    let props = row_group_rows.map(|n| {
        parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(n.max(1)))
            .build()
    });
    let file = File::create(path).map_err(|source| DataError::Io { path: shown(path), source })?;
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, props)
        .map_err(|e| perr(e.to_string()))?;
    w.write(&batch).map_err(|e| perr(e.to_string()))?;
    w.close().map_err(|e| perr(e.to_string()))?;
    Ok(())
}

/// Read every row of an image-classification parquet file, in file order.
pub fn read_rows(path: &Path) -> Result<Vec<ImageRow>, DataError> {
    let mut rows = Vec::new();
    for batch in RowBatches::open(path)? {
        rows.extend(batch?);
    }
    Ok(rows)
}

fn type_error(path: &Path, column: &str, found: &DataType, expected: &str) -> DataError {
    DataError::ColumnType {
        path: shown(path),
        column: column.into(),
        found: format!("{found}"),
        expected: expected.into(),
    }
}

const IMAGE_EXPECTED: &str = "struct<bytes: binary | large_binary, path: string> (or plain binary)";
const LABEL_EXPECTED: &str = "an integer type or bool";

fn check_image_type(path: &Path, dt: &DataType) -> Result<(), DataError> {
    match dt {
        DataType::Binary | DataType::LargeBinary => Ok(()),
        DataType::Struct(fields) => match fields.iter().find(|f| f.name() == "bytes") {
            Some(f) if matches!(f.data_type(), DataType::Binary | DataType::LargeBinary) => Ok(()),
            _ => Err(type_error(path, "image", dt, IMAGE_EXPECTED)),
        },
        _ => Err(type_error(path, "image", dt, IMAGE_EXPECTED)),
    }
}

fn check_label_type(path: &Path, dt: &DataType) -> Result<(), DataError> {
    if dt.is_integer() || *dt == DataType::Boolean {
        Ok(())
    } else {
        Err(type_error(path, "label", dt, LABEL_EXPECTED))
    }
}

fn labels_of(path: &Path, col: &ArrayRef, first_row: usize) -> Result<Vec<i64>, DataError> {
    let null_at = |i: usize| DataError::NullLabel { path: shown(path), row: first_row + i };
    if let Some(i) = (0..col.len()).find(|&i| col.is_null(i)) {
        return Err(null_at(i));
    }
    macro_rules! ints {
        ($t:ty) => {
            col.as_primitive::<$t>().values().iter().map(|&v| v as i64).collect()
        };
    }
    Ok(match col.data_type() {
        DataType::Int8 => ints!(Int8Type),
        DataType::Int16 => ints!(Int16Type),
        DataType::Int32 => ints!(Int32Type),
        DataType::Int64 => ints!(Int64Type),
        DataType::UInt8 => ints!(UInt8Type),
        DataType::UInt16 => ints!(UInt16Type),
        DataType::UInt32 => ints!(UInt32Type),
        DataType::UInt64 => {
            let values = col.as_primitive::<UInt64Type>().values();
            let mut out = Vec::with_capacity(values.len());
            for (i, &v) in values.iter().enumerate() {
                out.push(i64::try_from(v).map_err(|_| DataError::BadLabel {
                    path: shown(path),
                    row: first_row + i,
                    message: format!("label {v} does not fit in i64"),
                })?);
            }
            out
        }
        DataType::Boolean => col.as_boolean().iter().map(|v| i64::from(v == Some(true))).collect(),
        other => return Err(type_error(path, "label", other, LABEL_EXPECTED)),
    })
}

fn binary_at(arr: &ArrayRef, i: usize) -> Option<Vec<u8>> {
    fn get<O: arrow_array::OffsetSizeTrait>(
        a: &GenericBinaryArray<O>,
        i: usize,
    ) -> Option<Vec<u8>> {
        (!a.is_null(i)).then(|| a.value(i).to_vec())
    }
    if let Some(a) = arr.as_binary_opt::<i32>() {
        get(a, i)
    } else {
        arr.as_binary_opt::<i64>().and_then(|a| get(a, i))
    }
}

fn image_at(
    path: &Path,
    images: &ArrayRef,
    i: usize,
    row: usize,
) -> Result<(Vec<u8>, Option<String>), DataError> {
    if images.is_null(i) {
        return Err(DataError::NullImage { path: shown(path), row, image_path: None });
    }
    let Some(st) = images.as_struct_opt() else {
        // A plain binary column.
        return binary_at(images, i).map(|b| (b, None)).ok_or(DataError::NullImage {
            path: shown(path),
            row,
            image_path: None,
        });
    };
    let image_path = string_field(st, "path", i);
    let bytes = st.column_by_name("bytes").and_then(|b| binary_at(b, i)).ok_or_else(|| {
        DataError::NullImage { path: shown(path), row, image_path: image_path.clone() }
    })?;
    Ok((bytes, image_path))
}

fn string_field(st: &StructArray, name: &str, i: usize) -> Option<String> {
    let col = st.column_by_name(name)?;
    if col.is_null(i) {
        return None;
    }
    if let Some(s) = col.as_string_opt::<i32>() {
        Some(s.value(i).to_string())
    } else {
        col.as_string_opt::<i64>().map(|s| s.value(i).to_string())
    }
}
