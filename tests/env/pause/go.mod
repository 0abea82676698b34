module distr.local/testenv/pause

go 1.24
