//! The seed document's command lines (docs/modelpool/clip_vit.md of FusionBench), shared by
//! the config tests and the installed-binary test.

/// The seed document's command lines (loop variables substituted; `method=...` placeholders
/// become `method=dummy`; shell quoting already removed, except the `"'...'"` one which keeps
/// its inner quotes).
pub const SEED: &[&str] = &[
    "method=dummy modelpool=clip-vit-base-patch32_individual modelpool.models.0.path=tanganke/clip-vit-base-patch32_sun397 taskpool=clip-vit-classification_TA8 report_save_path=outputs/ViT-B-32/single-task/clip-vit-base-patch32_sun397.json",
    "method=dummy modelpool=clip-vit-large-patch14_individual modelpool.models.0.path=tanganke/clip-vit-large-patch14_sun397 taskpool=clip-vit-classification_TA8 taskpool.clip_model=openai/clip-vit-large-patch14 report_save_path=outputs/ViT-L-14/single-task/clip-vit-large-patch14_sun397.json",
    "method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual taskpool=dummy",
    "method=dummy modelpool=CLIPVisionModelPool/clip-vit-large-patch14_individual taskpool=dummy",
    "method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual modelpool.models._pretrained_.pretrained_model_name_or_path='tanganke/clip-vit-base-patch32_sun397' taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    "method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual modelpool.models._pretrained_.pretrained_model_name_or_path=tanganke/clip-vit-base-patch32_sun397 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 report_save_path=outputs/ViT-B-32/single-task/clip-vit-base-patch32_sun397.json",
    "method=dummy modelpool=CLIPVisionModelPool/clip-vit-large-patch14_individual modelpool.models._pretrained_.pretrained_model_name_or_path='tanganke/clip-vit-large-patch14_sun397' taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14",
    "method=simple_average modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    "method=simple_average modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8_model_only taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14",
    "method=fisher_merging/clip_fisher_merging modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    "method=fisher_merging/clip_fisher_merging method.dataloader_kwargs.batch_size=8 method.dataloader_kwargs.num_workers=4 modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14",
    "method=regmean/clip_regmean modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    "method=regmean/clip_regmean method.dataloader_kwargs.batch_size=8 method.dataloader_kwargs.num_workers=4 modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14",
    "method=task_arithmetic method.scaling_factor=0.3 modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    "method=task_arithmetic method.scaling_factor=0.1 modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 report_save_path=outputs/clip-vit-base-patch32_TA8_task_arithmetic_scaling_factor_0.1.json",
    "method=task_arithmetic method.scaling_factor=0.3 modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14",
    "method=ties_merging method.scaling_factor=0.3 method.threshold=20 modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    "method=ties_merging method.scaling_factor=1.0 method.threshold=20 modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 report_save_path=outputs/clip-vit-base-patch32_TA8_ties_merging_scaling_factor_1.0.json",
    "method=ties_merging method.scaling_factor=0.3 method.threshold=20 modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14",
    "method=adamerging method.name=clip_task_wise_adamerging method.save_merging_weights=outputs/clip-vit-base-patch32_TA8_task_wise_adamerging_weights.pt modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    "print_config=false method=adamerging method.name=clip_task_wise_adamerging method.save_merging_weights=outputs/clip-vit-large-patch14_TA8_task_wise_adamerging_weights.pt method.devices=4 method.batch_size=4 modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8 taskpool=dummy",
    "print_config=false method=adamerging method.name=clip_task_wise_adamerging method.weights=outputs/clip-vit-large-patch14_TA8_task_wise_adamerging_weights.pt modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14",
    "method=adamerging method.name=clip_layer_wise_adamerging method.save_merging_weights=merging_weights.pt modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 fabric.loggers.root_dir=outputs/logs/ViT-B-32 fabric.loggers.name=clip_layer_wise_adamerging_adam",
    "print_config=false method=adamerging method.name=clip_layer_wise_adamerging method.save_merging_weights=outputs/clip-vit-large-patch14_TA8_layer_wise_adamerging_weights.pt method.devices=4 method.batch_size=4 modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8 taskpool=dummy",
    "method=adamerging method.name=clip_layer_wise_adamerging method.weights=outputs/clip-vit-large-patch14_TA8_layer_wise_adamerging_weights.pt modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14",
    "method=weight_ensembling_moe method.name=clip_weight_ensembling_moe method.use_grad_accumulate=false method.save_checkpoint=outputs/clip-vit-base-patch32_TA8_weight_ensembling_moe_checkpoint.ckpt modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    "print_config=false method=weight_ensembling_moe method.name=clip_weight_ensembling_moe method.use_grad_accumulate=true method.save_checkpoint=outputs/clip-vit-large-patch14_TA8_weight_ensembling_moe_checkpoint.ckpt method.batch_size=4 method.devices=4 modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8 taskpool=dummy",
    "method=weight_ensembling_moe method.name=clip_weight_ensembling_moe method.checkpoint=outputs/clip-vit-large-patch14_TA8_weight_ensembling_moe_checkpoint.ckpt modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14",
    "method=task_vector_cos_similarity method.save_to_csv=outputs/clip-vit-base-patch32_cos.csv modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=dummy",
    "method=task_vector_cos_similarity method.save_to_csv=outputs/clip-vit-large-patch14_cos.csv modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 tsakpool=dummy",
    "method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_generalization_exp1",
    "method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_generalization_exp2",
    "--config-name clip-vit-base-patch32_robustness_corrupted corruption=contrast method=dummy",
    "method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_robustness_clean taskpool=clip-vit-base-patch32_robustness_clean",
];
