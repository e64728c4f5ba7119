-- Past selections. Each selection run writes one Parquet row file into the selections/
-- folder next to this DuckDB file (no DuckDB writer lock needed, so concurrent runs never
-- contend); this view reads them all. nds/warehouse.py fills in the folder's glob and keeps
-- a zero-row schema file there so the view is valid before the first selection.
CREATE OR REPLACE VIEW selections AS
SELECT * FROM read_parquet('{selections_glob}', union_by_name = true);
