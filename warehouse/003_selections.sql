-- Past selections. Each selection run writes one Parquet row file under selections/ next to
-- this DuckDB file (no DuckDB writer lock needed, so concurrent runs never contend);
-- nds/warehouse.py replaces this empty, typed placeholder with a view over those files.
CREATE OR REPLACE VIEW selections AS
SELECT * FROM (
    SELECT NULL::VARCHAR AS selection_id, NULL::TIMESTAMP AS created_at, NULL::VARCHAR AS index_version,
           NULL::VARCHAR AS bundle_sha256, NULL::VARCHAR AS mode, NULL::VARCHAR AS parameters,
           NULL::DOUBLE[] AS scores, NULL::DOUBLE[] AS expert_weights, NULL::VARCHAR AS manifest_location,
           NULL::VARCHAR AS manifest_sha256, NULL::BIGINT AS n_selected, NULL::BIGINT AS n_eligible,
           NULL::VARCHAR AS counts_per_dataset, NULL::DOUBLE AS seconds
) WHERE false;
