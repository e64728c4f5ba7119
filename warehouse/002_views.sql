-- Views a data engineer queries first. Recreated on every write connection (cheap).
-- Views list their rows in a stable order (DuckDB keeps a view's ORDER BY when read directly).
-- The newest completed index build.
CREATE OR REPLACE VIEW current_index AS
SELECT * FROM index_versions ORDER BY created_at DESC, index_version LIMIT 1;

-- Samples per (expert, domain): the long form behind cluster_summary.
CREATE OR REPLACE VIEW cluster_dataset_counts AS
SELECT w.index_version, w.expert, s.dataset, count(*) AS n_samples
FROM sample_weights w JOIN samples s USING (index_version, sample_id)
GROUP BY ALL
ORDER BY index_version, expert, dataset;

-- Per expert: size, dominant domain, rotation accuracy and a map domain -> count.
CREATE OR REPLACE VIEW cluster_summary AS
SELECT c.index_version, c.expert, c.name, c.size, c.top_dataset, c.top_dataset_share,
       c.rotation_accuracy, d.dataset_counts
FROM clusters c
LEFT JOIN (
    SELECT index_version, expert,
           map_from_entries(list({'k': dataset, 'v': n_samples} ORDER BY dataset)) AS dataset_counts
    FROM cluster_dataset_counts GROUP BY ALL
) d USING (index_version, expert)
ORDER BY c.index_version, c.expert;

-- Weight mass and sample counts by domain and expert. The mass is a sum of many 1/|S_k|
-- terms; as DECIMAL(18, 9) it reads 2.000000000, not 1.9999999999999902, and sums of it
-- (per dataset, per expert) stay exact.
CREATE OR REPLACE VIEW weights_by_dataset AS
SELECT w.index_version, s.dataset, w.expert, count(*) AS n_samples,
       CAST(sum(w.weight) AS DECIMAL(18, 9)) AS weight_mass
FROM sample_weights w JOIN samples s USING (index_version, sample_id)
GROUP BY ALL
ORDER BY index_version, dataset, expert;
