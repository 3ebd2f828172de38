{{/* Names */}}
{{- define "oversight.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "oversight.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "oversight.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels. Call with (dict "ctx" $ "component" "pipeline"). */}}
{{- define "oversight.selectorLabels" -}}
app.kubernetes.io/name: {{ include "oversight.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "oversight.labels" -}}
helm.sh/chart: {{ include "oversight.chart" .ctx }}
{{ include "oversight.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: oversight
{{- end -}}

{{- define "oversight.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "oversight.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "oversight.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "oversight.secretName" -}}
{{- default (printf "%s-secrets" (include "oversight.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "oversight.configName" -}}
{{- printf "%s-config" (include "oversight.fullname" .) -}}
{{- end -}}

{{- define "oversight.dataClaimName" -}}
{{- default (printf "%s-data" (include "oversight.fullname" .)) .Values.pipeline.persistence.existingClaim -}}
{{- end -}}

{{- define "oversight.modelsClaimName" -}}
{{- default (printf "%s-models" (include "oversight.fullname" .)) .Values.modelsVolume.existingClaim -}}
{{- end -}}

{{/* "true" when the shared reward-model volume is mounted (modelsVolume.enabled; the render fails with SQLite). */}}
{{- define "oversight.modelsVolumeOn" -}}
{{- if and .Values.modelsVolume.enabled (not (include "oversight.sqlite" .)) -}}true{{- end -}}
{{- end -}}

{{/*
Where reward.models_dir (config; default ./models) is in the pods: a relative path is relative to the image's
working directory, /data (deploy/Dockerfile WORKDIR; no pod sets workingDir).
*/}}
{{- define "oversight.modelsDir" -}}
{{- $dir := dig "reward" "models_dir" "./models" (default (dict) .Values.config) | toString -}}
{{- if not (hasPrefix "/" $dir) -}}
{{- $dir = printf "/data/%s" $dir -}}
{{- end -}}
{{- clean $dir -}}
{{- end -}}

{{/* "true" when the database is SQLite: one process, review inside the pipeline pod, data on a volume. */}}
{{- define "oversight.sqlite" -}}
{{- if hasPrefix "sqlite" .Values.database.url -}}true{{- end -}}
{{- end -}}

{{/* "true" when the review app runs inside the pipeline pod (`oversight run --review`). */}}
{{- define "oversight.reviewEmbedded" -}}
{{- if and .Values.review.enabled (include "oversight.sqlite" .) -}}true{{- end -}}
{{- end -}}

{{- define "oversight.dataOnClaim" -}}
{{- if and (include "oversight.sqlite" .) .Values.pipeline.persistence.enabled -}}true{{- end -}}
{{- end -}}

{{/*
Render-time checks. Every template includes this, so `helm template` and `helm install` fail before anything
reaches the cluster.
*/}}
{{- define "oversight.validate" -}}
{{- $p := .Values.pipeline -}}
{{- if and (include "oversight.sqlite" .) (gt (int $p.replicas) 1) -}}
{{- fail (printf "database.url is SQLite, which is for one process: pipeline.replicas is %d. Use PostgreSQL for more than one replica." (int $p.replicas)) -}}
{{- end -}}
{{- if and (include "oversight.sqlite" .) (or $p.autoscaling.enabled $p.keda.enabled) -}}
{{- fail "database.url is SQLite, which is for one process: pipeline.autoscaling and pipeline.keda need PostgreSQL." -}}
{{- end -}}
{{- if and $p.autoscaling.enabled $p.keda.enabled -}}
{{- fail "pipeline.autoscaling and pipeline.keda both scale the pipeline: enable one (KEDA creates its own HPA)." -}}
{{- end -}}
{{- if and (not .Values.database.url) (not .Values.secrets.existingSecret) -}}
{{- fail "database.url is empty: set it, or set secrets.existingSecret to a Secret with the key database-url." -}}
{{- end -}}
{{- if not (or (hasPrefix "sqlite:" .Values.database.url) (hasPrefix "postgresql" .Values.database.url) (hasPrefix "postgres:" .Values.database.url) (not .Values.database.url)) -}}
{{- fail "database.url must be sqlite:////data/FILE or postgresql://..." -}}
{{- end -}}
{{- if and (include "oversight.sqlite" .) (not (hasPrefix "sqlite:////data/" .Values.database.url)) -}}
{{- fail "a SQLite database must live on the data volume: database.url=sqlite:////data/FILE (the root filesystem is read-only)." -}}
{{- end -}}
{{- $drain := 10 -}}
{{- if lt (int $p.terminationGracePeriodSeconds) (add (int $p.preStopSleepSeconds) $drain 5 | int) -}}
{{- fail (printf "pipeline.terminationGracePeriodSeconds (%d) must cover preStopSleepSeconds (%d) + the 10 s drain + 5 s." (int $p.terminationGracePeriodSeconds) (int $p.preStopSleepSeconds)) -}}
{{- end -}}
{{- if lt (int .Values.review.terminationGracePeriodSeconds) (add (int .Values.review.preStopSleepSeconds) $drain | int) -}}
{{- fail "review.terminationGracePeriodSeconds must cover review.preStopSleepSeconds + 10 s." -}}
{{- end -}}
{{- if and .Values.review.ingress.enabled (not .Values.review.enabled) -}}
{{- fail "review.ingress.enabled needs review.enabled." -}}
{{- end -}}
{{- if and .Values.review.ingress.enabled (not .Values.review.ingress.hosts) -}}
{{- fail "review.ingress.enabled needs at least one entry in review.ingress.hosts." -}}
{{- end -}}
{{- if has (int .Values.review.metricsPort) (list (int .Values.review.port) (int $p.port)) -}}
{{- fail (printf "review.metricsPort (%d) must differ from review.port and pipeline.port: the review pod listens on all of them in the SQLite layout." (int .Values.review.metricsPort)) -}}
{{- end -}}
{{- if and .Values.inferenceWorker.enabled (include "oversight.sqlite" .) -}}
{{- fail "inferenceWorker.enabled needs PostgreSQL: database.url is SQLite, a file on the pipeline pod's volume that the inference worker pods cannot open. Set a postgresql:// database.url, or leave inferenceWorker.enabled false (the pipeline then runs the models itself)." -}}
{{- end -}}
{{- if and .Values.inferenceWorker.enabled (lt (int .Values.inferenceWorker.terminationGracePeriodSeconds) $drain) -}}
{{- fail (printf "inferenceWorker.terminationGracePeriodSeconds (%d) must be at least 10: the worker may take 10 s to stop after SIGTERM." (int .Values.inferenceWorker.terminationGracePeriodSeconds)) -}}
{{- end -}}
{{- if and .Values.inferenceWorker.enabled (not (dig "inference" "workers" true (default (dict) .Values.config))) -}}
{{- fail "inferenceWorker.enabled needs config.inference.workers (true, the default): with inference.external the pipeline commits the workers' results with later batches, through its worker threads." -}}
{{- end -}}
{{- if and .Values.modelsVolume.enabled (include "oversight.sqlite" .) -}}
{{- fail "modelsVolume.enabled needs PostgreSQL: with SQLite (database.url) the one pipeline pod and the rm-update Jobs already share the reward-model versions on the pipeline's data volume (pipeline.persistence). Leave modelsVolume.enabled false, or set a postgresql:// database.url." -}}
{{- end -}}
{{- if include "oversight.modelsVolumeOn" . -}}
{{- $dir := include "oversight.modelsDir" . -}}
{{- range list "/data" "/tmp" "/etc/oversight" "/etc/oversight-jobs" "/var/run/secrets/oversight" -}}
{{- if or (eq $dir "/") (eq $dir .) (hasPrefix (printf "%s/" $dir) .) (and (ne . "/data") (ne . "/tmp") (hasPrefix (printf "%s/" .) $dir)) -}}
{{- fail (printf "modelsVolume is mounted at reward.models_dir, which resolves to %s: that would cover or sit inside the chart's mount %s. Use a folder of its own, e.g. the default ./models (/data/models)." $dir .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (include "oversight.sqlite" .) .Values.review.enabled (eq (int .Values.review.port) (int $p.port)) -}}
{{- fail (printf "review.port and pipeline.port are both %d: with SQLite (database.url) the review UI runs inside the pipeline pod, which cannot listen twice on one port." (int $p.port)) -}}
{{- end -}}
{{- if and .Values.secrets.existingSecret .Values.database.url (not (include "oversight.sqlite" .)) -}}
{{- fail "database.url is a PostgreSQL URL and secrets.existingSecret is set: the URL would not be used (the pods read the key database-url of the existing Secret, which the chart does not write). Leave database.url empty and put the URL in that Secret under database-url." -}}
{{- end -}}
{{- $sm := .Values.metrics.serviceMonitor -}}
{{- if and $sm.enabled (gt (float64 (include "oversight.seconds" $sm.scrapeTimeout)) (float64 (include "oversight.seconds" $sm.interval))) -}}
{{- fail (printf "metrics.serviceMonitor.scrapeTimeout (%s) must not exceed its interval (%s): Prometheus refuses such a scrape configuration, and nothing would be scraped." $sm.scrapeTimeout $sm.interval) -}}
{{- end -}}
{{- range $name, $a := dict "pipeline.autoscaling" $p.autoscaling "review.autoscaling" .Values.review.autoscaling "inferenceWorker.autoscaling" .Values.inferenceWorker.autoscaling -}}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "%s.minReplicas (%d) is above its maxReplicas (%d): the API server refuses such a HorizontalPodAutoscaler." $name (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if and $p.keda.enabled (gt (int $p.keda.minReplicaCount) (int $p.keda.maxReplicaCount)) -}}
{{- fail (printf "pipeline.keda.minReplicaCount (%d) is above its maxReplicaCount (%d)." (int $p.keda.minReplicaCount) (int $p.keda.maxReplicaCount)) -}}
{{- end -}}
{{- $full := include "oversight.fullname" . -}}
{{- if gt (len $full) 46 -}}
{{- fail (printf "the release's full name %q is %d characters: names of its resources add up to 17 more (-inference-worker), and Kubernetes refuses a name over 63. Use a shorter release name or fullnameOverride (at most 46)." $full (len $full)) -}}
{{- end -}}
{{- include "oversight.validateReservedConfig" . -}}
{{- end -}}

{{/*
A Prometheus duration of the chart's values (values.schema.json: digits and one of ms, s, m, h) in seconds.
*/}}
{{- define "oversight.seconds" -}}
{{- $unit := regexFind "(ms|s|m|h)$" . -}}
{{- $n := float64 (trimSuffix $unit .) -}}
{{- if eq $unit "ms" -}}{{ divf $n 1000 }}{{- else if eq $unit "s" -}}{{ $n }}{{- else if eq $unit "m" -}}{{ mulf $n 60 }}{{- else -}}{{ mulf $n 3600 }}{{- end -}}
{{- end -}}

{{/*
A key of values.config that the chart sets itself or that holds a secret fails the render: the merge would
overwrite the first kind silently, and the second would land in a ConfigMap. files/reserved-config.yaml lists
them with the message (values.schema.json lets them through so that this message, not a schema error, explains).
*/}}
{{- define "oversight.validateReservedConfig" -}}
{{- $reserved := .Files.Get "files/reserved-config.yaml" | fromYaml -}}
{{- if not $reserved -}}
{{- fail "files/reserved-config.yaml is missing or empty" -}}
{{- end -}}
{{- range $key, $why := $reserved -}}
{{- $node := $.Values.config -}}
{{- $set := true -}}
{{- range splitList "." $key -}}
{{- if and $set (kindIs "map" $node) (hasKey $node .) -}}
{{- $node = index $node . -}}
{{- else -}}
{{- $set = false -}}
{{- end -}}
{{- end -}}
{{- if $set -}}
{{- fail (printf "config.%s %s." $key $why) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Optional CRDs. A resource whose API the cluster lacks is left out (the install would fail on it otherwise) and
NOTES.txt says so; `helm template` knows no cluster, so pass the API with --api-versions (Argo CD does that).
Each returns "true" when the feature is enabled and its API is available.
*/}}
{{- define "oversight.serviceMonitorOn" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") -}}true{{- end -}}
{{- end -}}

{{- define "oversight.prometheusRuleOn" -}}
{{- if and .Values.metrics.prometheusRule.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule") -}}true{{- end -}}
{{- end -}}

{{- define "oversight.kedaOn" -}}
{{- if and .Values.pipeline.keda.enabled (.Capabilities.APIVersions.Has "keda.sh/v1alpha1/ScaledObject") -}}true{{- end -}}
{{- end -}}

{{/*
The service's configuration file: values.config merged (deeply) with the keys the chart manages. The render has
already failed if values.config sets any of those (files/reserved-config.yaml), so the merge never overwrites a
user's setting; the merge is deep, so a user's other keys of a section the chart writes into (kafka.*, review.*,
inference.*) stay. inference.external is true when the inference workers run in pods of their own
(inferenceWorker.enabled): the pipeline then loads no model.
*/}}
{{- define "oversight.config" -}}
{{- $managed := dict
  "server" (dict "host" "0.0.0.0" "port" (int .Values.pipeline.port))
  "review" (dict "host" "0.0.0.0" "port" (int .Values.review.port) "metrics_host" "0.0.0.0" "metrics_port" (int .Values.review.metricsPort))
  "source" (dict "kind" "kafka")
  "kafka" (dict "bootstrap_servers" .Values.kafka.bootstrapServers "topic" .Values.kafka.topic "group_id" .Values.kafka.groupId)
  "dead_letter" (dict "path" "/data/dead-letter.jsonl")
  "database" (dict "migrate" .Values.database.migrate)
  "inference" (dict "external" (.Values.inferenceWorker.enabled | default false))
-}}
{{- if include "oversight.sqlite" . -}}
{{- $_ := set $managed.database "url" .Values.database.url -}}
{{- end -}}
{{- mustMergeOverwrite (deepCopy (default (dict) .Values.config)) $managed | toYaml -}}
{{- end -}}

{{/* Environment from the Secret. Call with (dict "ctx" $ "review" true/false). */}}
{{- define "oversight.secretEnv" -}}
{{- $secret := include "oversight.secretName" .ctx -}}
- name: OVERSIGHT_SAMPLING__KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: sampling-key
{{- if .review }}
- name: OVERSIGHT_REVIEW__SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: review-secret-key
{{- end }}
{{- if not (include "oversight.sqlite" .ctx) }}
- name: OVERSIGHT_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: database-url
{{- end }}
- name: OVERSIGHT_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: kafka-sasl-password
      optional: true
{{- end -}}

{{/*
Volumes every oversight container mounts. Call with (dict "ctx" $ "tmpSizeLimit" "1Gi" "data" <volume source>
"models" true/false): models adds the shared reward-model volume (modelsVolume) when it is on, for the pods that
train or load reward-model versions (pipeline, inference workers, rm-update Jobs); pass the same flag to
oversight.volumeMounts.
*/}}
{{- define "oversight.volumes" -}}
- name: config
  configMap:
    name: {{ include "oversight.configName" .ctx }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSizeLimit }}
- name: data
{{- toYaml .data | nindent 2 }}
- name: webhook-secret
  secret:
    secretName: {{ include "oversight.secretName" .ctx }}
    optional: true
    defaultMode: 0440
    items:
      - key: webhook-secret
        path: webhook-secret
{{- if and .models (include "oversight.modelsVolumeOn" .ctx) }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "oversight.modelsClaimName" .ctx }}
{{- end }}
{{- end -}}

{{/* Mounts of the volumes above. Call with (dict "ctx" $ "models" true/false), models as for oversight.volumes. */}}
{{- define "oversight.volumeMounts" -}}
- name: config
  mountPath: /etc/oversight
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /data
- name: webhook-secret
  mountPath: /var/run/secrets/oversight
  readOnly: true
{{- if and .models (include "oversight.modelsVolumeOn" .ctx) }}
# The whole claim (no subPath) over reward.models_dir, inside the per-pod /data.
- name: models
  mountPath: {{ include "oversight.modelsDir" .ctx }}
{{- end }}
{{- end -}}

{{/* Source of the /data volume of pipeline pods (and of jobs, which share the SQLite file). */}}
{{- define "oversight.dataVolume" -}}
{{- if include "oversight.dataOnClaim" . -}}
persistentVolumeClaim:
  claimName: {{ include "oversight.dataClaimName" . }}
{{- else -}}
emptyDir:
  sizeLimit: 1Gi
{{- end -}}
{{- end -}}

{{/* Topology spread constraints with the component's selector filled in where the values leave it out. */}}
{{- define "oversight.topologySpread" -}}
{{- $sel := include "oversight.selectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml -}}
{{- range .constraints }}
- {{ toYaml (merge (deepCopy .) (dict "labelSelector" (dict "matchLabels" $sel))) | nindent 2 | trim }}
{{- end }}
{{- end -}}

{{/* One ingress rule of a NetworkPolicy. Call with (dict "ports" (list "ops") "from" <peers; empty: anyone>). */}}
{{- define "oversight.networkPolicyRule" -}}
- ports:
    {{- range .ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .from }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Resources of an inference worker: inferenceWorker.resources with nvidia.com/gpu in the limits when gpu > 0. */}}
{{- define "oversight.inferenceWorkerResources" -}}
{{- $w := .Values.inferenceWorker -}}
{{- $resources := deepCopy (default (dict) $w.resources) -}}
{{- if gt (int $w.gpu) 0 -}}
{{- $limits := deepCopy (default (dict) $resources.limits) -}}
{{- $_ := set $limits "nvidia.com/gpu" (int $w.gpu) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/*
A Job of the user's own training system (jobs.retrain, jobs.rmTraining): their image, command, arguments,
environment and resources, restricted like the release's pods. The service fills in the request (labels, a name
from the request id, ACTION_REQUEST_* variables). Arguments: ctx (the root context), component, cfg (its values).
*/}}
{{- define "oversight.userJob" -}}
{{- $ := .ctx }}
{{- $c := .component }}
{{- $cfg := .cfg }}
{{- $j := $.Values.jobs }}
apiVersion: batch/v1
kind: Job
metadata:
  generateName: {{ include "oversight.fullname" $ }}-{{ $c }}-
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "oversight.labels" (dict "ctx" $ "component" $c) | nindent 4 }}
spec:
  backoffLimit: {{ $j.backoffLimit }}
  activeDeadlineSeconds: {{ $j.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $j.ttlSecondsAfterFinished }}
  template:
    metadata:
      labels:
        {{- include "oversight.labels" (dict "ctx" $ "component" $c) | nindent 8 }}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      securityContext:
        {{- toYaml $.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ $c }}
          image: {{ printf "%s:%s" $cfg.image.repository $cfg.image.tag }}
          {{- with $cfg.command }}
          command:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $cfg.args }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $cfg.env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $cfg.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml $.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: tmp
          emptyDir: {}
{{- end -}}
