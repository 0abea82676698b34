module distr.local/testenv/render-manifest

go 1.22
