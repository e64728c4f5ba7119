-- Past selections. Each selection run writes one Parquet row file into the selections/ folder
-- next to this DuckDB file (no DuckDB writer lock needed, so concurrent runs never contend); this
-- view reads them all. The path is relative: nds connections resolve it against the warehouse's
-- folder (file_search_path), so a copied warehouse folder reads its own rows; from the duckdb
-- command line, start in that folder or SET file_search_path to it. nds/platform/warehouse.py
-- keeps a zero-row schema file there so the view is valid before the first selection.
-- Row files written before schema 2 hold VARCHAR parameters/counts and no origin columns:
-- union_by_name reads them with NULLs there, and the view gives every row the same types.
CREATE OR REPLACE VIEW selections AS
SELECT selection_id,
       timezone('UTC', created_at) AS created_at,        -- stored as UTC wall time
       index_version, bundle_sha256, mode,
       CAST(parameters AS JSON) AS parameters,            -- the request: budget, temperature, seed, datasets, ...
       scores, expert_weights, manifest_location, manifest_sha256, n_selected, n_eligible,
       CAST(counts_per_dataset AS JSON) AS counts_per_dataset,   -- {"dataset": n, ...}
       seconds,
       coalesce(origin, 'unknown') AS origin,             -- cli, deployment, service, evaluation
       flow_run_id,                                       -- the Prefect flow run (deployment runs)
       requester,                                         -- who asked (the service's token name)
       coalesce(datasets, CAST(json_extract(CAST(parameters AS JSON), '$.datasets') AS VARCHAR[])) AS datasets
FROM read_parquet('{selections_glob}', union_by_name = true)
ORDER BY created_at, selection_id;
COMMENT ON VIEW selections IS 'Reads selections/*.parquet relative to file_search_path (nds sets it to this file''s folder) or else the working directory: SET file_search_path = ''<folder of this file>''';

-- Long form of counts_per_dataset: one row per (selection, dataset drawn from).
CREATE OR REPLACE VIEW selection_counts AS
SELECT selection_id, e.key AS dataset, e.value AS n
FROM (SELECT selection_id, created_at,
             unnest(map_entries(CAST(counts_per_dataset AS MAP(VARCHAR, BIGINT)))) AS e
      FROM selections)
ORDER BY created_at, selection_id, dataset;

-- The weight each selection's sampling law put on each dataset: sum over experts of the
-- expert's softmax weight times the dataset's weight mass in that expert, over the datasets its
-- filter allowed, normalised to sum to 1 (exclusions of single samples are not subtracted).
-- Compare with selection_counts: what was drawn against what was expected.
CREATE OR REPLACE VIEW selection_dataset_weights AS
WITH per AS (
    SELECT s.selection_id, s.created_at, s.index_version, w.dataset,
           sum(s.expert_weights[w.expert + 1] * w.weight_mass) AS mass
    FROM selections s
    JOIN weights_by_dataset w ON w.index_version = s.index_version
    WHERE s.datasets IS NULL OR list_contains(s.datasets, w.dataset)
    GROUP BY ALL
)
SELECT selection_id, index_version, dataset,
       round(mass / nullif(sum(mass) OVER (PARTITION BY selection_id), 0), 6) AS weight
FROM per
ORDER BY created_at, selection_id, dataset;
